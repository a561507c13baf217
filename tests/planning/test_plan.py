"""The memory planner against measurements of tiny models on this CPU (activations within 15% of
what autograd keeps; parameter, gradient and optimizer bytes equal to the allocated tensors),
its layout search, and its messages for layouts that cannot work."""

from __future__ import annotations

import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.planning.plan import (
    GB,
    Layout,
    Workload,
    fitting_layouts,
    layout_problems,
    main,
    plan_memory,
    stage_activation_bytes,
)
from tests.helpers.presets import TINY_GLM, TINY_MOE
from tests.helpers.synthetic import micro_batches

CPU = Workload(micro_batch=2, global_batch=2, bf16=False, gpu=False)
CASES = {
    "deepnorm": (TINY_GLM, None, "none"),
    "pre_ln": (dict(TINY_GLM, norm="pre_ln"), None, "none"),
    "dropout": (dict(TINY_GLM, attention_dropout=0.1, hidden_dropout=0.1), None, "none"),
    "moe": (TINY_GLM, TINY_MOE, "none"),
    "selective": (TINY_GLM, None, "selective"),
    "full": (TINY_GLM, TINY_MOE, "full"),
}


def _measure(model_kwargs, moe, recompute):
    """One training step in this process (a world of one): saved activations of a micro-batch,
    and the bytes of parameters, main_grad buffers and AdamW state."""
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.planning.plan import SavedActivations
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import MODEL_INPUTS, forward_backward, wrap_ddp

    model_cfg = ModelConfig(**model_kwargs)
    initialize(ParallelConfig(), model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, MoEConfig(**moe) if moe else None, ParallelConfig(), recompute=recompute))
    batch = micro_batches(1, CPU.micro_batch, model_cfg.seq_length, model_cfg.vocab_size, seed=1)[0]
    with SavedActivations(exclude=chunks[0].parameters()) as saved:
        chunks[0](**{k: batch[k] for k in MODEL_INPUTS}, targets=batch["targets"], gmask=batch["gmask"])
    optimizer = Optimizer(chunks, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)
    forward_backward(chunks, [batch])
    optimizer.step()
    params = list(chunks[0].parameters())
    return {
        "activations": saved.bytes,
        "params": sum(p.numel() * p.element_size() for p in params),
        "grads": sum(p.main_grad.numel() * p.main_grad.element_size() for p in params),
        "optimizer": sum(t.numel() * t.element_size() for s in optimizer.adam.state.values()
                         for t in s.values() if t.dim() > 0),
    }


@pytest.mark.parametrize("case", list(CASES))
def test_planner_matches_measured_memory(case):
    model_kwargs, moe, recompute = CASES[case]
    measured = _measure(model_kwargs, moe, recompute)
    model_cfg, moe_cfg = ModelConfig(**model_kwargs), MoEConfig(**moe) if moe else None
    layout = Layout(1, 1, 1, recompute=recompute)
    held, _ = stage_activation_bytes(model_cfg, moe_cfg, layout, CPU.micro_batch, 4, 0, mask=4)
    assert abs(held - measured["activations"]) / measured["activations"] <= 0.15, (held, measured)
    plan = plan_memory(model_cfg, moe_cfg, layout, CPU)
    assert plan.param_bytes == measured["params"]
    assert plan.grad_bytes == measured["grads"]
    assert plan.optimizer_bytes == measured["optimizer"]
    assert plan.autocast_bytes == 0 and plan.in_flight == 1


def _30b(moe: MoEConfig | None = None):
    from moe_morpheus.config.experiment import compose_experiment

    exp = compose_experiment(["+experiment=dense", "model=morpheus_30b"])
    return exp.model, moe


WORK = Workload(micro_batch=1, global_batch=1024, bf16=True)


def test_parallelism_and_zero_divide_what_they_should():
    model, _ = _30b()
    base = plan_memory(model, None, Layout(tp=1, pp=1, dp=8), WORK)
    tp8 = plan_memory(model, None, Layout(tp=8, pp=1, dp=1), WORK)
    zero = plan_memory(model, None, Layout(tp=1, pp=1, dp=8, zero1=True), WORK)
    sp = plan_memory(model, None, Layout(tp=8, pp=1, dp=1, sequence_parallel=True), WORK)
    assert base.params == pytest.approx(34.94e9, rel=1e-3)  # docs/design.md#model-presets: the preset's 34.9B
    assert tp8.params == pytest.approx(base.params / 8, rel=0.01)  # only LayerNorms, biases replicated
    assert zero.optimizer_bytes == pytest.approx(base.optimizer_bytes / 8)
    assert zero.grad_bytes == base.grad_bytes  # ZeRO-1 shards optimizer state only
    assert sp.activation_bytes < tp8.activation_bytes
    full = plan_memory(model, None, Layout(tp=8, pp=1, dp=1, recompute="full"), WORK)
    assert full.activation_bytes < tp8.activation_bytes / 5


def test_fitting_layouts_fit_and_come_cheapest_first():
    model, _ = _30b()
    fits = fitting_layouts(model, None, 64, 80, WORK)
    assert fits and all(f.peak_bytes <= 80 * GB and f.layout.gpus == 64 for f in fits)
    # 55 layers: no pipeline split of 64 GPUs divides them.
    assert {f.layout.pp for f in fits} == {1}
    order = [("none", "selective", "full").index(f.layout.recompute) for f in fits]
    assert order == sorted(order)
    # 8 GPUs: 4.4B parameters each at tp=8 are 79 GB of model state (18 bytes per parameter with
    # the autocast cache): only full recomputation leaves room for the activations.
    assert {(f.layout.tp, f.layout.recompute) for f in fitting_layouts(model, None, 8, 80, WORK)} == {(8, "full")}


def test_bad_layouts_say_why():
    model, _ = _30b()
    problems = layout_problems(model, None, Layout(tp=16, pp=1, dp=1), WORK)
    assert any("num_attention_heads=72 is not divisible by parallel.tp=16" in p for p in problems)
    problems = layout_problems(model, None, Layout(tp=8, pp=4, dp=1), WORK)
    assert any("num_layers=55 is not divisible by parallel.pp * virtual_pp = 4" in p for p in problems)
    assert any("global_batch_size=1024 is not a multiple" in p
               for p in layout_problems(model, None, Layout(tp=1, pp=1, dp=3), WORK))
    moe = MoEConfig(layer_freq=2, num_experts=64, top_k=2)
    assert any("ep=3" in p for p in layout_problems(model, moe, Layout(tp=1, pp=1, dp=3, ep=3), WORK))


def test_cli_reports_layout_and_fit(capsys):
    args = ["+experiment=dense", "model=morpheus_30b", "parallel.tp=8", "trainer.micro_batch_size=1",
            "trainer.global_batch_size=1024", "plan.gpus=64"]
    assert main(args + ["plan.gpu_memory_gb=141"]) == 0
    out = capsys.readouterr().out
    assert "tp8 pp1 ep1 dp8" in out and "optimizer (AdamW m, v fp32)" in out and "fit 141 GB" in out
    assert main(args + ["plan.gpu_memory_gb=40"]) == 1
    assert "does NOT fit 40 GB" in capsys.readouterr().out
    assert main(["+experiment=dense", "model=morpheus_30b", "parallel.pp=4"]) == 2
    assert "num_layers=55 is not divisible" in capsys.readouterr().err
    assert main(["+experiment=dense", "plan.bogus=1"]) == 2


def test_saved_activations_excludes_parameters():
    from moe_morpheus.planning.plan import SavedActivations

    weight = torch.randn(3, 3, requires_grad=True)
    with SavedActivations(exclude=[weight]) as saved:
        (weight * 2.0).sum()
    assert saved.bytes == 0


@pytest.mark.parametrize("experiment", ["dense", "moe_64e", "moe_8e"])
def test_plan_counts_the_experiments_parameters_as_the_budget_does(experiment):
    # The planner's per-GPU inventory (one GPU, no split) against the budget's independent count:
    # both must build experts of the resolved width (granularity 2: 9600 on morpheus_30b).
    from moe_morpheus.config.experiment import compose_experiment
    from moe_morpheus.planning.budget import param_counts

    exp = compose_experiment([f"+experiment={experiment}", "model=morpheus_30b"])
    moe = exp.moe_or_none
    plan = plan_memory(exp.model, moe, Layout(tp=1, pp=1, dp=1), WORK)
    assert plan.params == param_counts(exp.model, moe).total
    # 8 experts: ep 8 leaves one expert per GPU, so the experts on a GPU shrink 8-fold.
    if moe is not None:
        one = plan_memory(exp.model, moe, Layout(tp=1, pp=1, dp=moe.num_experts, ep=moe.num_experts), WORK).params
        per_expert = 3 * 7200 * 9600 + 2 * 9600 + 7200
        assert plan.params - one == 27 * (moe.num_experts - 1) * per_expert


def test_plan_warns_about_a_demo_batch_on_the_30b_model(capsys):
    assert main(["+experiment=dense", "model=morpheus_30b", "parallel.tp=8", "trainer=cpu_demo"]) == 0
    captured = capsys.readouterr()
    assert "global batch 16, " in captured.out
    assert "warning: 34.94B active parameters with a global batch of 16 x 2048" in captured.err
    assert main(["+experiment=dense", "model=morpheus_30b", "parallel.tp=8"]) == 0
    captured = capsys.readouterr()
    assert "global batch 1024, bf16 autocast" in captured.out and "warning" not in captured.err
