"""Sequence parallelism (Megatron-Core's ``sequence_parallel``) at TP=2 gives the loss and
gradients of TP=2 without it, for the dense model and a MoE model whose layer takes its
sequence-parallel slice directly."""

from __future__ import annotations

import pytest

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import full_gradients, relative_error
from tests.helpers.presets import TINY_GLM, TINY_MOE
from tests.helpers.synthetic import micro_batches


def _loss_and_grads(moe: dict | None, sequence_parallel: bool):
    from moe_morpheus.model import build_model
    from moe_morpheus.moe import set_aux_loss_scale
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.step import forward_backward, wrap_ddp

    model_cfg = ModelConfig(**TINY_GLM)
    parallel = ParallelConfig(tp=2, sequence_parallel=sequence_parallel)
    initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, MoEConfig(**moe) if moe else None, parallel, seed=3))
    batches = micro_batches(2, 2, model_cfg.seq_length, model_cfg.vocab_size, seed=4)
    set_aux_loss_scale(1.0 / len(batches))
    loss = forward_backward(chunks, batches)
    return loss, full_gradients(chunks)


def _both_ways():
    """Dense and MoE, each without and with sequence parallelism, in one 2-process run."""
    return {name: (_loss_and_grads(moe, False), _loss_and_grads(moe, True))
            for name, moe in (("dense", None), ("moe", TINY_MOE))}


@pytest.fixture(scope="module")
def results():
    return run_distributed(_both_ways, 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dense", "moe"])
def test_sequence_parallel_equals_tensor_parallel(results, name):
    for rank_results in results:
        (ref_loss, ref_grads), (loss, grads) = rank_results[name]
        assert abs(loss - ref_loss) / ref_loss <= 1e-6
        assert set(grads) == set(ref_grads)
        for key, ref in ref_grads.items():
            assert relative_error(grads[key], ref) <= 1e-5, key


def test_sequence_parallel_needs_tensor_parallel_and_divisible_sequence():
    with pytest.raises(ConfigError, match="needs tensor parallelism"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match="seq_length=33 is not divisible by parallel.tp=2"):
        ParallelConfig(tp=2, sequence_parallel=True).validate_model(ModelConfig(**dict(TINY_GLM, seq_length=33)))
