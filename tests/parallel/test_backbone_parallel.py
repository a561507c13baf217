"""The GLM backbone gives the same loss and gradients at TP=2, PP=2 (1F1B and interleaved) as
in one process, on gloo; bad layouts fail fast on every rank."""

from __future__ import annotations

import pytest

from moe_morpheus.config import ConfigError, ModelConfig, ParallelConfig
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import full_gradients, relative_error
from tests.helpers.presets import TINY_GLM_4_LAYERS
from tests.helpers.synthetic import micro_batches


def train_step_grads(tp: int, pp: int, vpp: int | None, model_kwargs: dict):
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.step import forward_backward, wrap_ddp

    model_cfg = ModelConfig(**model_kwargs)
    parallel = ParallelConfig(tp=tp, pp=pp, virtual_pp=vpp)
    initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, None, parallel, seed=7))
    batches = micro_batches(4, 2, model_cfg.seq_length, model_cfg.vocab_size, seed=3)
    loss = forward_backward(chunks, batches)
    return loss, full_gradients(chunks)


@pytest.fixture(scope="module")
def reference():
    return run_distributed(train_step_grads, 1, 1, 1, None, TINY_GLM_4_LAYERS)[0]


def merge(results):
    grads = {}
    for _, rank_grads in results:
        grads.update(rank_grads)
    return results[0][0], grads


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,vpp", [(2, 1, None), (1, 2, None), (1, 2, 2)], ids=["tp2", "pp2", "pp2-vpp2"])
def test_parallel_layout_matches_single_process(reference, tp, pp, vpp):
    ref_loss, ref_grads = reference
    results = run_distributed(train_step_grads, tp * pp, tp, pp, vpp, TINY_GLM_4_LAYERS)
    loss, grads = merge(results)
    assert all(abs(r[0] - loss) == 0 for r in results), "every rank must report the same loss"
    assert abs(loss - ref_loss) / ref_loss <= 1e-6
    assert set(grads) == set(ref_grads)
    for name, ref in ref_grads.items():
        assert relative_error(grads[name], ref) <= 1e-5, name


@pytest.mark.slow
def test_embedding_gradient_reaches_both_uses(reference):
    """The tied matrix gets gradient from the input embedding and from the logits."""
    _, grads = reference
    assert grads["embedding.word_embeddings.weight"].abs().sum() > 0


def _bad_layouts(cases):
    """Each case raises on this rank before any collective; returns the messages."""
    from moe_morpheus.parallel import initialize

    messages = []
    for tp, pp, model_kwargs in cases:
        try:
            initialize(ParallelConfig(tp=tp, pp=pp), ModelConfig(**model_kwargs))
        except ConfigError as error:
            messages.append(str(error))
    return messages


@pytest.mark.slow
def test_bad_layouts_fail_fast_on_every_rank():
    cases = [
        (4, 1, TINY_GLM_4_LAYERS),
        (1, 2, dict(TINY_GLM_4_LAYERS, num_layers=3)),
        (2, 1, dict(TINY_GLM_4_LAYERS, num_attention_heads=1)),
    ]
    expected = [
        "world size 2 is not a multiple of parallel.tp * parallel.pp = 4 * 1 = 4",
        "model.num_layers=3 is not divisible by parallel.pp * virtual_pp = 2 * 1 = 2",
        "parallel.tp=2 is larger than model.num_attention_heads=1",
    ]
    for messages in run_distributed(_bad_layouts, 2, cases, timeout=60):
        assert len(messages) == len(cases)
        for message, fragment in zip(messages, expected):
            assert fragment in message


def _raise_bad_layout():
    from moe_morpheus.parallel import initialize

    initialize(ParallelConfig(tp=4), ModelConfig(**TINY_GLM_4_LAYERS))


@pytest.mark.slow
def test_failing_rank_does_not_leave_peers_waiting():
    """The error reaches the launcher at once instead of a collective timeout."""
    with pytest.raises(RuntimeError, match="world size 2 is not a multiple"):
        run_distributed(_raise_bad_layout, 2, timeout=60)


def test_config_errors_name_the_numbers():
    with pytest.raises(ConfigError, match="hidden_size=66 is not divisible by model.num_attention_heads=4"):
        ModelConfig(hidden_size=66, num_attention_heads=4)
    with pytest.raises(ConfigError, match="num_attention_heads=6 is not divisible by parallel.tp=4"):
        ParallelConfig(tp=4).validate_model(ModelConfig(hidden_size=96, num_attention_heads=6))
    with pytest.raises(ConfigError, match="parallel.pp \\* virtual_pp = 2 \\* 3 = 6"):
        ParallelConfig(pp=2, virtual_pp=3).validate_model(ModelConfig(num_layers=4))
