"""ZeRO-1 (``trainer.zero1``): sharded AdamW updates equal the unsharded optimizer's at dp=2
(dense; MoE with experts sharded over their expert-data-parallel group; MoE at EP=2), the
optimizer state per rank is halved (measured), and the whole moments for checkpoints equal the
unsharded optimizer's and load back into the chunks. Weight decay: both optimizers decay the
same tensors, and a zero-gradient step shrinks exactly the weight matrices (batched expert
biases are biases)."""

from __future__ import annotations

import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import relative_error
from tests.helpers.presets import TINY_GLM, TINY_MOE
from tests.helpers.synthetic import micro_batches

pytestmark = pytest.mark.slow
CASES = {"dense": (None, 1), "moe-ep1": (TINY_MOE, 1), "moe-ep2": (TINY_MOE, 2)}
LR, WD = 1e-2, 0.1


def _build(moe: dict | None, ep: int, zero: bool):
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import wrap_ddp
    from moe_morpheus.train.zero import ZeroOptimizer

    model_cfg = ModelConfig(**TINY_GLM)
    parallel = ParallelConfig(ep=ep)
    dp = initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, MoEConfig(**moe) if moe else None, parallel, seed=5))
    # Clip below the gradient norm and eps 1e-3: see tests/helpers/steps.py::clipped_update.
    kind = ZeroOptimizer if zero else Optimizer
    optimizer = kind(chunks, lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-3, grad_clip=0.05)
    return model_cfg, dp, chunks, optimizer


def _train(moe: dict | None, ep: int, zero: bool, steps: int = 2):
    from megatron.core import parallel_state

    from moe_morpheus.moe import set_aux_loss_scale
    from moe_morpheus.parallel.gather import gather_full
    from moe_morpheus.train.step import forward_backward

    model_cfg, dp, chunks, optimizer = _build(moe, ep, zero)
    batches = micro_batches(4, 2, model_cfg.seq_length, model_cfg.vocab_size, seed=9)
    rank = parallel_state.get_data_parallel_rank()
    mine = batches[rank * len(batches) // dp: (rank + 1) * len(batches) // dp]
    for _ in range(steps):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        set_aux_loss_scale(1.0 / (len(mine) * dp))
        forward_backward(chunks, mine)
        optimizer.step()
    state = sum(t.numel() * t.element_size() for s in optimizer.adam.state.values()
                for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    return gather_full(chunks, lambda p: p), state, chunks, optimizer


def _compare_all():
    out = {}
    for name, (moe, ep) in CASES.items():
        plain, plain_bytes, _, plain_optimizer = _train(moe, ep, zero=False)
        sharded, zero_bytes, chunks, optimizer = _train(moe, ep, zero=True)
        assert zero_bytes == optimizer.state_bytes()
        out[name] = (plain, sharded, plain_bytes, zero_bytes)
        if name == "moe-ep1":
            out["round_trip"] = _moments_round_trip(plain_optimizer, optimizer, chunks)
        if moe is not None:
            out[f"decay-{name}"] = {kind: _decay_step(moe, ep, kind == "zero") for kind in ("plain", "zero")}
    return out


def _decayed_by_name(chunks, optimizer) -> dict[str, bool]:
    """Whether AdamW got each parameter (ZeRO-1: this rank's chunk of it) in its decayed group."""
    module = chunks[0].module
    names = {id(p): n for n, p in module.named_parameters()}
    param_of_view = {id(c.view): c.param for c in getattr(optimizer, "chunks", [])}
    return {names[id(param_of_view.get(id(t), t))]: group["weight_decay"] > 0
            for group in optimizer.adam.param_groups for t in group["params"]}


def _decay_step(moe: dict, ep: int, zero: bool):
    """One AdamW step with zero gradients (Adam's update is 0, only the decay acts): whole
    tensors before and after, and what AdamW was told to decay."""
    from moe_morpheus.parallel.gather import gather_full

    _, _, chunks, optimizer = _build(moe, ep, zero)
    before = gather_full(chunks, lambda p: p)
    for chunk in chunks:
        chunk.zero_grad_buffer()
    assert optimizer.step().total == 0.0
    return before, gather_full(chunks, lambda p: p), _decayed_by_name(chunks, optimizer)


def _moments_round_trip(plain, zero, chunks):
    """Whole moments from ZeRO-1 at dp=2 equal the unsharded optimizer's; loading them into a
    fresh ZeRO-1 optimizer gives back the same chunks and step."""
    whole = zero.moments_like_params()
    equal = all(relative_error(whole[z][m], plain.adam.state[p][m]) <= 1e-6
                for p, z in zip(plain.params, zero.params) for m in ("exp_avg", "exp_avg_sq"))
    fresh = type(zero)(chunks, lr=LR, weight_decay=WD, betas=(0.9, 0.95), eps=1e-3, grad_clip=0.05)
    fresh.load_moments(whole, step=2)
    same = all(torch.equal(fresh.adam.state[a][m], zero.adam.state[b][m]) and int(fresh.adam.state[a]["step"]) == 2
               for a, b in zip(fresh.adam.state, zero.adam.state) for m in ("exp_avg", "exp_avg_sq"))
    return equal, same, zero.state_dict()["state"].keys() == fresh.state_dict()["state"].keys()


@pytest.fixture(scope="module")
def results():
    return run_distributed(_compare_all, 2)


@pytest.mark.parametrize("case", list(CASES))
def test_zero1_updates_equal_unsharded(results, case):
    for by_case in results:
        plain, sharded, _, _ = by_case[case]
        assert set(plain) == set(sharded)
        for name, ref in plain.items():
            assert relative_error(sharded[name], ref) <= 1e-6, name


@pytest.mark.parametrize("case", ["dense", "moe-ep1"])
def test_zero1_halves_optimizer_state_at_dp2(results, case):
    """m and v: 8 bytes per parameter, per rank 8 * ceil(numel / 2) with ZeRO-1 at dp=2 (every
    parameter of these models is sharded over 2 ranks: dense over DP, experts over expert-DP)."""
    for by_case in results:
        _, _, plain_bytes, zero_bytes = by_case[case]
        assert 0.5 <= zero_bytes / plain_bytes <= 0.505, (zero_bytes, plain_bytes)


@pytest.mark.parametrize("case", ["moe-ep1", "moe-ep2"])
def test_weight_decay_per_logical_parameter(results, case):
    """Both optimizers decay the same tensors; a step with zero gradient and wd 0.1 shrinks
    every weight matrix (attention, dense FFN, router, embedding, each expert's) by exactly
    1 - lr * wd and leaves every bias and LayerNorm as it was, the batched [E, F] / [E, D]
    expert biases included."""
    for by_case in results:
        steps = by_case[f"decay-{case}"]
        assert steps["plain"][2] == steps["zero"][2]
        for before, after, _ in steps.values():
            assert any(".experts.b_" in name for name in before)
            for name, value in before.items():
                leaf = name.rsplit(".", 1)[-1]
                bias_or_norm = leaf.startswith("b_") or leaf == "bias" or "norm." in name
                if bias_or_norm:
                    assert torch.equal(after[name], value), name
                else:
                    # One fp32 rounding of p * (1 - lr * wd); no decay would be off by 1e-3.
                    assert relative_error(after[name], value * (1 - LR * WD)) <= 1e-7, name


def test_zero1_whole_moments_for_checkpoints(results):
    for by_case in results:
        assert by_case["round_trip"] == (True, True, True)


def _save_sharded(directory: str):
    """ZeRO-1 at dp=2 (MoE, experts over expert-DP) trains 2 steps and saves a checkpoint; also
    returns the unsharded optimizer's moments for the same steps, by parameter name."""
    from pathlib import Path

    from moe_morpheus.train.checkpoint import TrainState, layout, model_shape, save_checkpoint

    _, _, plain_chunks, plain = _train(TINY_MOE, 1, zero=False)
    _, _, chunks, zero = _train(TINY_MOE, 1, zero=True)
    manifest = {"config": {}, "layout": layout(ParallelConfig()),
                "model_shape": model_shape(ModelConfig(**TINY_GLM), MoEConfig(**TINY_MOE))}
    save_checkpoint(Path(directory), TrainState(step=2), chunks, zero, manifest=manifest, keep=2, checksums=False)
    names = {id(p): n for n, p in plain_chunks[0].module.named_parameters()}
    return {names[id(p)]: {m: plain.adam.state[p][m].clone() for m in ("exp_avg", "exp_avg_sq")} for p in plain.params}


def _load_unsharded(directory: str):
    """One process, plain AdamW: load the ZeRO-1 checkpoint (resharded from dp=2 to dp=1)."""
    from pathlib import Path

    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.checkpoint import layout, load_checkpoint, model_shape, newest_valid
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import wrap_ddp

    model_cfg, moe_cfg = ModelConfig(**TINY_GLM), MoEConfig(**TINY_MOE)
    initialize(ParallelConfig(), model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, moe_cfg, ParallelConfig(), seed=5))
    optimizer = Optimizer(chunks, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3, grad_clip=0.05)
    path = newest_valid(Path(directory), checksums=False)
    load_checkpoint(path, chunks, optimizer, shape=model_shape(model_cfg, moe_cfg), current_layout=layout(ParallelConfig()))
    names = {id(p): n for n, p in chunks[0].module.named_parameters()}
    return optimizer.step_count(), {names[id(p)]: {m: optimizer.adam.state[p][m] for m in ("exp_avg", "exp_avg_sq")}
                                    for p in optimizer.params}


def test_zero1_checkpoint_reshards_into_the_unsharded_optimizer(tmp_path):
    """Saved under ZeRO-1 at dp=2, loaded by one process with the plain optimizer: the moments
    equal those the plain optimizer reached itself, and AdamW's step count is kept."""
    expected = run_distributed(_save_sharded, 2, str(tmp_path))[0]
    step, loaded = run_distributed(_load_unsharded, 1, str(tmp_path))[0]
    assert step == 2 and set(loaded) == set(expected)
    for name, moments in expected.items():
        for moment, value in moments.items():
            assert relative_error(loaded[name][moment], value) <= 1e-6, (name, moment)
