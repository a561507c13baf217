"""Clipped optimizer updates at TP=2, PP=2 and EP=2 equal one process's (relative 1e-5), and a
MoE model at TP=2 equals TP=1; the expert load summed over ranks equals one process's on the
whole batch, on every rank; parameter counts match the built model."""

from __future__ import annotations

import pytest

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.planning.budget import param_counts
from tests.distributed import run_distributed
from tests.parallel.test_backbone_parallel import full_gradients, relative_error
from tests.synthetic import micro_batches

MODEL = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=200, seq_length=32)
MOE = dict(layer_freq=2, num_experts=4, top_k=2, expert_hidden_size=96)


def clipped_update(tp: int, pp: int, ep: int, moe: dict | None, steps: int = 2, sequence_parallel: bool = False):
    """Two optimizer steps (clip active) on a global batch of 4 micro-batches of 2 rows; with
    MoE also each step's routing statistics summed over the world (as the trainer logs them)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from moe_morpheus.model import build_model
    from moe_morpheus.moe import collect_moe_stats, set_aux_loss_scale
    from moe_morpheus.parallel import initialize
    from moe_morpheus.parallel.gather import gather_full
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import forward_backward, wrap_ddp

    model_cfg = ModelConfig(**MODEL)
    moe_cfg = MoEConfig(**moe) if moe else None
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep, sequence_parallel=sequence_parallel)
    dp = initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, moe_cfg, parallel, seed=5))
    # A clip far below the gradient norm, so the clipped update depends on the global norm.
    # eps 1e-3 instead of 1e-8: Adam's first steps are ~lr * sign(g) where |g| << eps does not
    # hold, so gradients of 1e-9 that differ in their last bits (any reduction order does that)
    # would move parameters by lr in different directions; with eps above the smallest
    # gradients the update is a smooth function of the clipped gradient, which is what is tested.
    optimizer = Optimizer(chunks, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3, grad_clip=0.05)
    batches = micro_batches(4, 2, model_cfg.seq_length, model_cfg.vocab_size, seed=9)
    dp_rank = parallel_state.get_data_parallel_rank()
    per_rank = len(batches) // dp
    mine = batches[dp_rank * per_rank: (dp_rank + 1) * per_rank]
    losses, norms, stats = [], [], []
    for _ in range(steps):
        for chunk in chunks:
            chunk.zero_grad_buffer()
        set_aux_loss_scale(1.0 / (len(mine) * dp))
        losses.append(forward_backward(chunks, mine))
        if moe_cfg:
            stats.append(collect_moe_stats(chunks, dist.group.WORLD, num_layers=model_cfg.num_layers,
                                           num_experts=moe_cfg.num_experts))
        norms.append(optimizer.step().total)
    grads = full_gradients(chunks) if ep == 1 else None
    params = gather_full(chunks, lambda param: param)
    return losses, norms, params, grads, stats


@pytest.fixture(scope="module")
def dense_reference():
    return run_distributed(clipped_update, 1, 1, 1, 1, None)[0]


@pytest.fixture(scope="module")
def moe_reference():
    return run_distributed(clipped_update, 1, 1, 1, 1, MOE)[0]


def _merged(results):
    params = {}
    for result in results:
        params.update(result[2])
    return results[0][0], results[0][1], params


def _assert_same(results, reference, tol=1e-5):
    losses, norms, params = _merged(results)
    ref_losses, ref_norms, ref_params = reference[:3]
    for a, b in zip(losses, ref_losses):
        assert abs(a - b) / b <= tol
    for a, b in zip(norms, ref_norms):
        assert abs(a - b) / b <= tol, (norms, ref_norms)
    assert set(params) == set(ref_params)
    for name, ref in ref_params.items():
        assert relative_error(params[name], ref) <= tol, name


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_dense_clipped_updates_match_one_process(dense_reference, tp, pp):
    _assert_same(run_distributed(clipped_update, 2, tp, pp, 1, None), dense_reference)


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)], ids=["ep2-dp2", "tp2"])
def test_moe_clipped_updates_match_one_process(moe_reference, tp, ep):
    """EP=2 over two data-parallel ranks, and a MoE model at TP=2 (each TP rank routes half the
    tokens, gate gradients summed), both equal one process holding every expert; so does the
    load summed over ranks (each rank routed only part of the batch)."""
    results = run_distributed(clipped_update, 2, tp, 1, ep, MOE)
    _assert_same(results, moe_reference)
    _assert_same_load(results, moe_reference)


@pytest.mark.parametrize("tp,pp,sp", [(1, 2, False), (2, 1, True)], ids=["pp2", "tp2-sp"])
def test_moe_load_summed_over_stages_and_sequence_parts(moe_reference, tp, pp, sp):
    """PP=2: each stage routes one MoE layer, yet every rank reports both; TP=2 with sequence
    parallelism: each TP rank routes its half of the sequence, and the halves are summed."""
    _assert_same_load(run_distributed(clipped_update, 2, tp, pp, 1, MOE, 2, sp), moe_reference)


def _assert_same_load(results, reference):
    """The load each rank reports equals one process's on the whole global batch, exactly (counts
    of (token, slot) assignments); the balance loss is the mean over data-parallel replicas."""
    ref_stats = reference[4]
    assert [sorted(k for k in step if k.endswith("/load")) for step in ref_stats] == [["moe/layer2/load",
                                                                                     "moe/layer4/load"]] * 2
    for step, ref in enumerate(ref_stats):
        # 4 micro-batches x 2 rows x 32 tokens, top-2, dropless: 512 assignments per layer.
        assert all(sum(ref[f"moe/layer{n}/load"]) == 512 for n in (2, 4))
        for result in results:
            got = result[4][step]
            assert got == results[0][4][step]  # every rank holds the same numbers
            for key, value in ref.items():
                if key.endswith("/load"):
                    assert got[key] == value, (step, key)
                else:
                    assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), (step, key)
            assert got.keys() == ref.keys()


def _count_built(moe):
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize

    model_cfg = ModelConfig(**MODEL)
    initialize(ParallelConfig(), model_cfg)
    chunk = build_model(model_cfg, MoEConfig(**moe) if moe else None, ParallelConfig())[0]
    return sum(p.numel() for p in chunk.parameters())


@pytest.mark.parametrize("moe", [None, MOE, dict(MOE, layer_freq=1, num_experts=3, top_k=1)])
def test_param_counts_equal_the_built_model(moe):
    built = _count_built(moe)  # a world of one, in this process
    counts = param_counts(ModelConfig(**MODEL), MoEConfig(**moe) if moe else None)
    assert counts.total == built
    assert counts.embedding + counts.non_embedding == built
