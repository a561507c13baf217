"""Activation recomputation (``trainer.recompute``: selective, full) gives the gradients of no
recomputation, for a MoE model at EP=2 with dropout on (the RNG states are replayed through
Megatron-Core's checkpoint on the CPU generator), counts MoE routing once, and keeps less."""

from __future__ import annotations

import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import relative_error
from tests.helpers.presets import TINY_GLM, TINY_MOE
from tests.helpers.synthetic import micro_batches

MODEL = dict(TINY_GLM, hidden_dropout=0.1, attention_dropout=0.1)
MODES = ("none", "selective", "full")


def _run(mode: str):
    from megatron.core import tensor_parallel

    from moe_morpheus.model import build_model
    from moe_morpheus.moe import collect_moe_stats, set_aux_loss_scale
    from moe_morpheus.parallel import initialize
    from moe_morpheus.planning.plan import SavedActivations
    from moe_morpheus.train.step import MODEL_INPUTS, forward_backward, wrap_ddp

    model_cfg = ModelConfig(**MODEL)
    parallel = ParallelConfig(ep=2)
    initialize(parallel, model_cfg, seed=11)  # same RNG streams for every mode
    chunks = wrap_ddp(build_model(model_cfg, MoEConfig(**TINY_MOE), parallel, seed=3, recompute=mode))
    batches = micro_batches(2, 2, model_cfg.seq_length, model_cfg.vocab_size, seed=4 + dist_rank())
    set_aux_loss_scale(1.0 / (2 * len(batches)))
    loss = forward_backward(chunks, batches)
    grads = {name: p.main_grad.clone() for name, p in chunks[0].module.named_parameters()}
    stats = collect_moe_stats(chunks)
    tensor_parallel.model_parallel_cuda_manual_seed(11)
    batch = batches[0]
    with SavedActivations(exclude=chunks[0].parameters()) as saved:
        chunks[0](**{k: batch[k] for k in MODEL_INPUTS}, targets=batch["targets"], gmask=batch["gmask"])
    return loss, grads, stats, saved.bytes


def dist_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank()


def _all_modes():
    return {mode: _run(mode) for mode in MODES}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_all_modes, 2)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gradients_equal_no_recompute(results, mode):
    for by_mode in results:
        ref_loss, ref_grads, ref_stats, _ = by_mode["none"]
        loss, grads, stats, _ = by_mode[mode]
        assert abs(loss - ref_loss) / ref_loss <= 1e-6
        for name, ref in ref_grads.items():
            assert ref.abs().max() > 0, name
            assert relative_error(grads[name], ref) <= 1e-5, name
        # The recompute pass routes again but records nothing: per-micro-batch loads are the same.
        assert stats["moe/layer2/load"] == ref_stats["moe/layer2/load"]


@pytest.mark.slow
def test_recompute_keeps_less_activation_memory(results):
    saved = {mode: results[0][mode][3] for mode in MODES}
    print("saved activation bytes per micro-batch:", saved)
    assert saved["full"] < saved["selective"] < saved["none"]


def test_saved_activations_counts_each_storage_once():
    from moe_morpheus.planning.plan import SavedActivations

    weight = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8, requires_grad=True)
    with SavedActivations(exclude=[weight]) as saved:
        y = x @ weight  # saves x and weight; weight is excluded
        z = (y * y).sum()  # saves y (once, although twice as an operand)
    assert saved.bytes == (4 * 8 + 4 * 8) * 4
    z.backward()
