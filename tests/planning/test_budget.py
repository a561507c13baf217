"""Parameter counts, FLOPs and budgets against arithmetic written out by hand."""

import pytest

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig
from moe_morpheus.planning.budget import (
    BudgetConfig,
    ParamCounts,
    chinchilla_tokens,
    flops_per_token,
    format_budget,
    param_counts,
    plan_run,
)


def tiny():
    # h = 8, 2 heads, 2 layers, F = 24, vocab 100 padded to 128.
    return ModelConfig(num_layers=2, hidden_size=8, num_attention_heads=2, ffn_hidden_size=24,
                       vocab_size=100, make_vocab_size_divisible_by=128, seq_length=16)


# The tiny model's inventory, term by term (h = 8, F = 24, V = 128):
EMB = 128 * 8  # 1024
LAYER_COMMON = (2 * 8 + 2 * 8) + (3 * 8 * 8 + 3 * 8) + (8 * 8 + 8)  # LNs 32 + QKV 216 + out 72 = 320
DENSE_FFN = (8 * 24 + 24) + (8 * 24 + 24) + (24 * 8 + 8)  # 216 + 216 + 200 = 632
FINAL_LN = 2 * 8  # 16


def test_dense_counts_by_hand():
    counts = param_counts(tiny())
    assert EMB == 1024 and LAYER_COMMON == 320 and DENSE_FFN == 632
    total = EMB + 2 * (LAYER_COMMON + DENSE_FFN) + FINAL_LN
    assert total == 2944
    assert counts == ParamCounts(total=2944, active=2944, embedding=1024, non_embedding=1920)
    assert counts.active_non_embedding == 1920
    # A disabled MoE config (layer_freq 0) is the dense model.
    assert param_counts(tiny(), MoEConfig(layer_freq=0)) == counts


def test_moe_active_vs_total():
    moe = MoEConfig(layer_freq=2, num_experts=4, top_k=2, expert_hidden_size=16)
    counts = param_counts(tiny(), moe)
    router = 4 * 8 + 4  # 36
    expert = (8 * 16 + 16) * 2 + (16 * 8 + 8)  # 144 + 144 + 136 = 424
    # layer_freq 2: layer 0 dense, layer 1 MoE.
    total = EMB + 2 * LAYER_COMMON + DENSE_FFN + router + 4 * expert + FINAL_LN
    active = EMB + 2 * LAYER_COMMON + DENSE_FFN + router + 2 * expert + FINAL_LN
    assert (total, active) == (4044, 3196)
    assert counts == ParamCounts(total=4044, active=3196, embedding=1024, non_embedding=3020)
    assert counts.active_non_embedding == 3196 - 1024


def test_layer_freq_semantics():
    model = ModelConfig(num_layers=6, hidden_size=8, num_attention_heads=2, ffn_hidden_size=24,
                        vocab_size=100, seq_length=16)
    dense = param_counts(model).total
    per_moe_layer = (4 * 8 + 4) + 4 * DENSE_FFN - DENSE_FFN  # router + 4 experts (Fe = F) - dense FFN
    for freq, moe_layers in ((1, 6), (2, 3), (3, 2), (4, 1), (7, 0)):
        moe = MoEConfig(layer_freq=freq, num_experts=4, top_k=1)
        assert param_counts(model, moe).total == dense + moe_layers * per_moe_layer, freq
        # top-1 of 4 experts with Fe = F: only the router is extra per active MoE layer.
        assert param_counts(model, moe).active == dense + moe_layers * (4 * 8 + 4), freq


def test_flops_worked_example():
    s = 16
    # Per layer forward: QKV 2*3*64 = 384, out 2*64 = 128, scores 2*16*8 = 256, values 256,
    # GeGLU 2*3*8*24 = 1152 -> 2176; logits 2*8*128 = 2048; x3 for training.
    assert flops_per_token(tiny(), s) == 3 * (2 * 2176 + 2048) == 19200
    moe = MoEConfig(layer_freq=2, num_experts=4, top_k=2, expert_hidden_size=16)
    # Layer 1's FFN: 2 experts x 2*3*8*16 = 1536 instead of 1152; the router is not counted.
    assert flops_per_token(tiny(), s, moe) == 3 * (2176 + (2176 - 1152 + 1536) + 2048) == 20352
    # Doubling the sequence adds 4sh per layer per forward: 3 * 2 * 4*16*8.
    assert flops_per_token(tiny(), 2 * s) - flops_per_token(tiny(), s) == 3 * 2 * 4 * 16 * 8
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(tiny(), 0)


def test_flops_match_narayanan_for_a_4h_mlp():
    # Narayanan et al. 2021 without recomputation: 72 B s l h^2 (1 + s/(6h) + V/(12 l h)) per
    # iteration for a 4h two-matrix MLP. A GeGLU with F = 8h/3 has the same 16h^2 MLP FLOPs.
    model = ModelConfig(num_layers=4, hidden_size=96, num_attention_heads=4, ffn_hidden_size=256,
                        vocab_size=1024, seq_length=64)
    s, l, h, v = 64, 4, 96, 1024
    assert flops_per_token(model, s) == pytest.approx(72 * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h)) / s)


def test_chinchilla_table3():
    assert chinchilla_tokens(400e6) == pytest.approx(8.0e9)
    assert 6 * 400e6 * chinchilla_tokens(400e6) == pytest.approx(1.92e19)
    assert chinchilla_tokens(1e9, tokens_per_param=10) == pytest.approx(1e10)
    with pytest.raises(ValueError, match="positive"):
        chinchilla_tokens(0)


def test_morpheus_30b_counts():
    model = ModelConfig(num_layers=55, hidden_size=7200, num_attention_heads=72, ffn_hidden_size=19200,
                        vocab_size=100_000, seq_length=2048)
    counts = param_counts(model)
    fpt = flops_per_token(model, 2048)
    print(f"morpheus_30b: {counts}, active_non_embedding={counts.active_non_embedding}, "
          f"flops/token={fpt:.4e} (6N = {6 * counts.total:.4e})")
    h, f, v = 7200, 19200, 100_096  # 100,000 padded to a multiple of 128
    per_layer = 4 * h + 4 * h * h + 4 * h + 3 * h * f + 2 * f + h
    assert counts.total == v * h + 55 * per_layer + 2 * h == 34_940_781_600
    assert counts.embedding == 720_691_200
    assert counts.total == pytest.approx(34.9e9, rel=2e-3)
    # Detailed vs 6N: attention over 2048 tokens (4sh per layer) and the logits (2hV) add more than
    # the embedding's 6Vh that 6N counts but the lookup does not cost: about +4.6%.
    assert fpt / (6 * counts.total) == pytest.approx(1.046, abs=0.001)


def test_budget_config_validation():
    assert BudgetConfig().params == "active"
    with pytest.raises(ConfigError, match="budget.params"):
        BudgetConfig(params="embedding")
    with pytest.raises(ConfigError, match="budget.chinchilla_fraction"):
        BudgetConfig(chinchilla_fraction=0.0)
    with pytest.raises(ConfigError, match="budget.tokens_per_param"):
        BudgetConfig(tokens_per_param=-1)


def test_plan_run_by_fraction_steps_and_tokens():
    moe = MoEConfig(layer_freq=2, num_experts=4, top_k=2, expert_hidden_size=16)
    # Budget: 20 x 3196 active params = 63,920 tokens; half of it at 64 tokens/step = 499.4 steps.
    plan = plan_run(tiny(), moe, BudgetConfig(chinchilla_fraction=0.5), tokens_per_step=64)
    assert plan.n_params == 3196 and plan.budget_tokens == 63_920
    assert plan.steps == 499 and plan.tokens == 499 * 64
    assert plan.budget_fraction == pytest.approx(499 * 64 / 63_920)
    assert plan.flops == 20352 * 499 * 64
    assert plan.flops_6nd == 6 * 3196 * 499 * 64

    by_total = plan_run(tiny(), moe, BudgetConfig(chinchilla_fraction=0.5, params="total"), 64)
    assert by_total.n_params == 4044 and by_total.steps == round(0.5 * 20 * 4044 / 64)
    no_emb = plan_run(tiny(), moe, BudgetConfig(params="active_non_embedding"), 64, steps=10)
    assert no_emb.n_params == 3196 - 1024 and no_emb.tokens == 640

    by_tokens = plan_run(tiny(), None, BudgetConfig(), 64, tokens=1000)
    assert by_tokens.steps == 16 and by_tokens.tokens == 1024  # 15.6 steps -> 16
    assert by_tokens.budget_fraction == pytest.approx(1024 / (20 * 2944))

    text = format_budget(plan)
    print(text)
    assert "total 4.04K" in text and "active 3.20K" in text and "499 steps" in text
    assert "6ND" in text and f"{plan.flops:.3e}" in text


def test_format_budget_units():
    model = ModelConfig(num_layers=55, hidden_size=7200, num_attention_heads=72, ffn_hidden_size=19200,
                        vocab_size=100_000, seq_length=2048)
    plan = plan_run(model, None, BudgetConfig(chinchilla_fraction=1.0), tokens_per_step=4 * 1024 * 2048)
    text = format_budget(plan)
    print(text)
    assert "total 34.94B" in text and "embedding 720.69M" in text and "698.8" in text  # 698.8B tokens


def test_plan_run_errors():
    with pytest.raises(ConfigError, match="unspecified"):
        plan_run(tiny(), None, BudgetConfig(), 64)
    with pytest.raises(ConfigError, match="ambiguous"):
        plan_run(tiny(), None, BudgetConfig(chinchilla_fraction=1.0), 64, steps=10)
    with pytest.raises(ConfigError, match="ambiguous"):
        plan_run(tiny(), None, BudgetConfig(), 64, steps=10, tokens=640)
    # 1e-4 x 58,880 tokens = 5.9 tokens at 64 tokens/step.
    with pytest.raises(ConfigError, match=r"budget of 6 tokens at 64 tokens/step rounds to 0 steps: "
                                          r"raise budget.chinchilla_fraction or lower the batch"):
        plan_run(tiny(), None, BudgetConfig(chinchilla_fraction=1e-4), 64)
    with pytest.raises(ConfigError, match="tokens of 10 tokens at 64 tokens/step rounds to 0 steps"):
        plan_run(tiny(), None, BudgetConfig(), 64, tokens=10)
    with pytest.raises(ConfigError, match="steps=0"):
        plan_run(tiny(), None, BudgetConfig(), 64, steps=0)
    with pytest.raises(ConfigError, match="tokens=-5"):
        plan_run(tiny(), None, BudgetConfig(), 64, tokens=-5)
    with pytest.raises(ConfigError, match="tokens_per_step"):
        plan_run(tiny(), None, BudgetConfig(), 0, steps=1)


def test_budget_command_prints_the_30b_preset_without_building_it(capsys):
    from moe_morpheus.planning.budget import main

    main(["+experiment=dense", "model=morpheus_30b"])
    out = capsys.readouterr().out
    assert "55 layers, hidden 7200, 72 heads, FFN 19200" in out
    assert "total 34.94B" in out and "embedding 720.69M" in out


# ---------------------------------------------------------------- expert width on every preset
def _compose(*overrides):
    from moe_morpheus.config.experiment import compose_experiment

    return compose_experiment(list(overrides))


def _presets() -> list[str]:
    from moe_morpheus.config.experiment import CONF_DIR

    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


@pytest.mark.parametrize("experiment", ["moe_64e", "moe_8e"])
@pytest.mark.parametrize("preset", _presets())
def test_moe_experiments_keep_the_dense_active_parameters_on_every_preset(experiment, preset):
    dense = _compose("+experiment=dense", f"model={preset}")
    moe = _compose(f"+experiment={experiment}", f"model={preset}")
    model, f, h = moe.model, moe.model.ffn_hidden, moe.model.hidden_size
    assert moe.moe.expert_hidden(model) * 2 == f  # granularity 2 of this preset's own FFN
    dense_active = param_counts(dense.model).active
    counts = param_counts(model, moe.moe)
    # Two experts of F/2 hold the dense FFN's 3hF + 2F weights and biases; what a MoE layer adds to
    # the active count is its router (E h + E) and the second expert's fc2 bias (h).
    moe_layers = sum(moe.moe.is_moe_layer(i) for i in range(model.num_layers))
    assert moe_layers == model.num_layers // 2
    e = moe.moe.num_experts
    assert counts.active == dense_active + moe_layers * (e * h + e + h)
    assert abs(counts.active - dense_active) / dense_active <= 0.01
    # The detailed FLOPs differ only by what they leave out (router, biases): none.
    assert flops_per_token(model, model.seq_length, moe.moe) == flops_per_token(dense.model, model.seq_length)


@pytest.mark.parametrize("experiment", ["moe_64e", "moe_8e", "upcycle_64e"])
def test_glm_tiny_experts_stay_192_wide(experiment):
    # The demo runs' results were produced with moe.expert_hidden_size=192 on glm_tiny (FFN 384):
    # granularity 2 must build exactly that model.
    exp = _compose(f"+experiment={experiment}")
    assert exp.model.ffn_hidden == 384 and exp.moe.expert_hidden(exp.model) == 192
    absolute = MoEConfig(layer_freq=2, num_experts=exp.moe.num_experts, top_k=2, expert_hidden_size=192)
    assert param_counts(exp.model, exp.moe) == param_counts(exp.model, absolute)


def test_absolute_expert_width_and_its_conflicts():
    exp = _compose("+experiment=moe_64e", "model=morpheus_30b", "moe.granularity=null", "moe.expert_hidden_size=4800")
    assert exp.moe.expert_hidden(exp.model) == 4800
    absolute = param_counts(exp.model, exp.moe)
    # 19200 / 4 = 4800: the absolute width is the one counted (and built).
    assert absolute == param_counts(exp.model, MoEConfig(layer_freq=2, num_experts=64, top_k=2, granularity=4))
    assert absolute.active < param_counts(exp.model, MoEConfig(layer_freq=2, num_experts=64, top_k=2,
                                                               granularity=2)).active
    assert MoEConfig(layer_freq=2, expert_hidden_size=7).expert_hidden(exp.model) == 7
    assert MoEConfig(layer_freq=2).expert_hidden(exp.model) == 19200  # neither set: g = 1
    with pytest.raises(ConfigError, match="moe.granularity=2 and moe.expert_hidden_size=96 are both set"):
        MoEConfig(layer_freq=2, granularity=2, expert_hidden_size=96)
    with pytest.raises(ConfigError, match="are both set"):
        _compose("+experiment=moe_8e", "moe.expert_hidden_size=96")
    with pytest.raises(ConfigError, match=r"moe.granularity=7 does not divide model.ffn_hidden_size=384: pick one "
                                          r"of its divisors near 7 \(4, 6, 8\)"):
        _compose("+experiment=moe_8e", "moe.granularity=7")
    with pytest.raises(ConfigError, match="moe.granularity=0 must be >= 1"):
        MoEConfig(layer_freq=2, granularity=0)


def test_cluster_trainer_comes_with_the_30b_preset_and_the_demo_batch_warns(capsys):
    from moe_morpheus.planning.budget import main

    assert _compose("+experiment=dense").trainer.global_batch_size == 16  # cpu_demo
    cluster = _compose("+experiment=moe_64e", "model=morpheus_30b").trainer
    assert (cluster.global_batch_size, cluster.micro_batch_size, cluster.precision) == (1024, 1, "bf16")
    # Intermediate evaluations on a quarter of each (capped) validation set; the demo data takes every row.
    assert cluster.eval_subset == 0.25 and _compose("+experiment=dense").data.valid_rows is None
    assert _compose("+experiment=dense", "model=morpheus_30b", "trainer=cpu_demo").trainer.global_batch_size == 16

    assert main(["+experiment=moe_64e", "model=morpheus_30b"]) == 0
    out, err = capsys.readouterr()
    # 20 tokens x 34.95B active = 699.07B; the experiment's 1.2% of it at 1024 x 2048 tokens per step.
    assert "experts 9600 wide" in out and "total 382.12B, active 34.95B" in out
    assert "4,000 steps x 2,097,152 tokens/step" in out and "warning" not in err
    assert main(["+experiment=moe_64e", "model=morpheus_30b", "trainer=cpu_demo"]) == 0
    err = capsys.readouterr().err
    assert "warning: 34.95B active parameters with a global batch of 16 x 2048" in err and "trainer=cluster" in err
    assert main(["+experiment=moe_64e"]) == 0 and "warning" not in capsys.readouterr().err  # glm_tiny: a demo
    assert main(["+experiment=moe_8e", "moe.granularity=5"]) == 2
    assert "error: moe.granularity=5 does not divide" in capsys.readouterr().err
