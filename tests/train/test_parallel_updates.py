"""Clipped optimizer updates at TP=2, PP=2 and EP=2 equal one process's (relative 1e-5), and a
MoE model at TP=2 equals TP=1; the expert load summed over ranks equals one process's on the
whole batch, on every rank; parameter counts match the built model."""

from __future__ import annotations

import pytest

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.planning.budget import param_counts
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import relative_error
from tests.helpers.presets import TINY_GLM_4_LAYERS, TINY_MOE
from tests.helpers.steps import clipped_update


@pytest.fixture(scope="module")
def dense_reference():
    return run_distributed(clipped_update, 1, 1, 1, 1, None)[0]


@pytest.fixture(scope="module")
def moe_reference():
    return run_distributed(clipped_update, 1, 1, 1, 1, TINY_MOE)[0]


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


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["tp2", "pp2"])
def test_dense_clipped_updates_match_one_process(dense_reference, tp, pp):
    _assert_same(run_distributed(clipped_update, 2, tp, pp, 1, None), dense_reference)


@pytest.mark.slow
@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 1)], ids=["ep2-dp2", "tp2"])
def test_moe_clipped_updates_match_one_process(moe_reference, tp, ep):
    """EP=2 over two data-parallel ranks, and a MoE model at TP=2 (each TP rank routes half the
    tokens, gate gradients summed), both equal one process holding every expert; so does the
    load summed over ranks (each rank routed only part of the batch)."""
    results = run_distributed(clipped_update, 2, tp, 1, ep, TINY_MOE)
    _assert_same(results, moe_reference)
    _assert_same_load(results, moe_reference)


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,sp", [(1, 2, False), (2, 1, True)], ids=["pp2", "tp2-sp"])
def test_moe_load_summed_over_stages_and_sequence_parts(moe_reference, tp, pp, sp):
    """PP=2: each stage routes one MoE layer, yet every rank reports both; TP=2 with sequence
    parallelism: each TP rank routes its half of the sequence, and the halves are summed."""
    _assert_same_load(run_distributed(clipped_update, 2, tp, pp, 1, TINY_MOE, 2, sp), moe_reference)


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

    model_cfg = ModelConfig(**TINY_GLM_4_LAYERS)
    initialize(ParallelConfig(), model_cfg)
    chunk = build_model(model_cfg, MoEConfig(**moe) if moe else None, ParallelConfig())[0]
    return sum(p.numel() for p in chunk.parameters())


@pytest.mark.parametrize("moe", [None, TINY_MOE, dict(TINY_MOE, layer_freq=1, num_experts=3, top_k=1)])
def test_param_counts_equal_the_built_model(moe):
    built = _count_built(moe)  # a world of one, in this process
    counts = param_counts(ModelConfig(**TINY_GLM_4_LAYERS), MoEConfig(**moe) if moe else None)
    assert counts.total == built
    assert counts.embedding + counts.non_embedding == built
