"""Dense -> MoE upcycling (moe_morpheus/upcycle/convert.py): function preservation of copy and
virtual_group (logits, relative 1e-5 fp32) in a world of one and across a layout change
(dense TP=2 -> MoE TP=1 x EP=2), he_scaling's step-0 loss, Drop-Upcycling's exact fraction,
and the bad inputs."""

from __future__ import annotations

import json

import pytest
import torch

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.config.upcycle import UpcycleConfig, UpcycleError, granularity
from moe_morpheus.upcycle.convert import upcycle_ffn
from moe_morpheus.upcycle.load import load_dense, resolve_source
from tests.helpers.distributed import run_distributed
from tests.helpers.numerics import relative_error
from tests.helpers.presets import TINY_GLM
from tests.helpers.synthetic import micro_batches

# hidden 64: dense FFN 192 (8/3 h rounded up to 64); granularity 2 -> experts of 96.
TARGETS = {
    "copy": (dict(num_experts=4, top_k=2, expert_hidden_size=None), {}),
    "virtual_group": (dict(num_experts=8, top_k=2, expert_hidden_size=96), {}),
    "he_scaling": (dict(num_experts=8, top_k=2, expert_hidden_size=96), {}),
    "drop": (dict(num_experts=4, top_k=2, expert_hidden_size=None), dict(drop_fraction=0.5)),
}


def _logits(chunks, batch):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from moe_morpheus.train.step import MODEL_INPUTS

    model = chunks[0].module.eval() if hasattr(chunks[0], "module") else chunks[0].eval()
    with torch.no_grad():
        logits = model(**{k: batch[k] for k in MODEL_INPUTS}, gmask=batch["gmask"])
    group = parallel_state.get_tensor_model_parallel_group()
    shards = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, logits.contiguous(), group=group)
    return torch.cat(shards, dim=-1)


def _loss(logits, batch):
    mask = batch["loss_mask"].bool()
    return torch.nn.functional.cross_entropy(logits[mask], batch["targets"][mask]).item()


def _dense_checkpoint(directory: str, tp: int):
    """A dense model of seed 3 saved at TP=tp with a trainer state; returns (path, logits, batch)."""
    from omegaconf import OmegaConf

    from moe_morpheus.config.experiment import ExperimentConfig
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.checkpoint import TrainState, layout, model_shape, save_checkpoint
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import wrap_ddp

    exp = ExperimentConfig(model=ModelConfig(**TINY_GLM), parallel=ParallelConfig(tp=tp))
    initialize(exp.parallel, exp.model)
    chunks = wrap_ddp(build_model(exp.model, None, exp.parallel, seed=3))
    optimizer = Optimizer(chunks, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-8, grad_clip=1.0)
    manifest = {"config": OmegaConf.to_container(OmegaConf.structured(exp)), "layout": layout(exp.parallel),
                "model_shape": model_shape(exp.model, None)}
    state = TrainState(step=7, consumed_samples=56, tokens=1792, flops=5.5e9, run_id="dense-run")
    path = save_checkpoint(directory, state, chunks, optimizer, manifest=manifest, keep=1, checksums=True)
    batch = micro_batches(1, 2, exp.model.seq_length, exp.model.vocab_size, seed=4)[0]
    return path, _logits(chunks, batch), batch


def _upcycled_logits(source, mode: str, parallel: ParallelConfig, batch):
    from moe_morpheus.config import InitConfig
    from moe_morpheus.config.experiment import ExperimentConfig
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.upcycle.load import upcycle_into

    moe, options = TARGETS[mode]
    exp = ExperimentConfig(model=ModelConfig(**TINY_GLM), moe=MoEConfig(layer_freq=1, **moe), parallel=parallel,
                           init=InitConfig(from_dense=str(source)), upcycle=UpcycleConfig(mode=mode, **options))
    initialize(exp.parallel, exp.model)
    chunks = build_model(exp.model, exp.moe, exp.parallel, seed=9)
    state = upcycle_into(chunks, exp, source)
    return _logits(chunks, batch), state


def _world_of_one(directory: str):
    path, dense, batch = _dense_checkpoint(directory, tp=1)
    out = {"dense_loss": _loss(dense, batch)}
    for mode in TARGETS:
        logits, state = _upcycled_logits(path, mode, ParallelConfig(), batch)
        out[mode] = (relative_error(logits, dense), _loss(logits, batch))
    out["state"] = state
    return out


@pytest.mark.slow
def test_copy_and_virtual_group_preserve_the_function_in_a_world_of_one(tmp_path):
    out = run_distributed(_world_of_one, 1, str(tmp_path / "dense"))[0]
    print({k: v for k, v in out.items() if k != "state"})
    assert out["copy"][0] <= 1e-5 and out["virtual_group"][0] <= 1e-5
    # He et al.'s scaling and re-initialised units change the function (step-0 loss reported).
    assert out["he_scaling"][0] > 1e-3 and out["drop"][0] > 1e-3
    state = out["state"]
    assert (state.step, state.consumed_samples) == (0, 56)  # fresh schedule, dense data position
    assert state.lineage["kind"] == "upcycled" and state.lineage["from_run"] == "dense-run"
    assert (state.lineage["tokens"], state.lineage["flops"], state.lineage["mode"]) == (1792, 5.5e9, "drop")
    assert state.lineage["from_checkpoint"].endswith("step_00000007")


def _layout_change(directory: str):
    # Dense saved at TP=2; converted in the same two processes into MoE TP=1 x EP=2 (dp=2).
    path, dense, batch = _dense_checkpoint(directory, tp=2)
    return {mode: relative_error(_upcycled_logits(path, mode, ParallelConfig(ep=2), batch)[0], dense)
            for mode in ("copy", "virtual_group")}


@pytest.mark.slow
def test_function_preserved_across_a_layout_change(tmp_path):
    errors = run_distributed(_layout_change, 2, str(tmp_path / "dense"))
    print(errors)
    for rank_errors in errors:
        assert rank_errors["copy"] <= 1e-5 and rank_errors["virtual_group"] <= 1e-5


def _decisions_of_an_upcycled_model():
    """A dense model with distinct random values in every tensor (biases too), copy-upcycled into
    MoE layers 1 and 3 (4 experts): each parameter's weight-decay decision by name, dense and
    MoE, and the dense FFN tensor every expert tensor was copied from, found by value."""
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.parallel.gather import gather_full
    from moe_morpheus.train.optim import decay_decisions
    from moe_morpheus.upcycle.convert import upcycle_tensors
    from moe_morpheus.upcycle.load import load_whole

    model_cfg = ModelConfig(**{**TINY_GLM, "num_layers": 4})
    moe_cfg = MoEConfig(layer_freq=2, num_experts=4, top_k=2, expert_hidden_size=None)
    initialize(ParallelConfig(), model_cfg)
    dense, moe = build_model(model_cfg, None, ParallelConfig(), seed=3), build_model(model_cfg, moe_cfg, ParallelConfig())
    with torch.no_grad():
        for param in dense[0].parameters():
            param.normal_()
    tensors = gather_full(dense, lambda p: p)
    load_whole(moe, upcycle_tensors(tensors, model_cfg, moe_cfg, UpcycleConfig(mode="copy", seed=0)))

    def by_name(chunks):
        decided = decay_decisions(chunks)
        return {name: decided[id(p)] for name, p in chunks[0].named_parameters()}

    sources = {}
    for name, param in moe[0].named_parameters():
        if ".experts." in name:
            prefix = name.split(".moe.")[0] + "."
            sources[name] = [n for n, t in tensors.items() if n.startswith(prefix) and torch.equal(param[0], t)]
    return by_name(dense), by_name(moe), sources


@pytest.mark.slow
def test_upcycled_experts_get_the_weight_decay_of_the_dense_tensors_they_copy():
    """Expert weights decay like the dense FFN weights, expert biases ([E, F], [E, D]) like the
    dense FFN biases (not at all), every other tensor as in the dense model; the router's
    matrix is decayed, its bias not."""
    dense, moe, sources = run_distributed(_decisions_of_an_upcycled_model, 1)[0]
    assert len(sources) == 2 * 6 and all(len(found) == 1 for found in sources.values()), sources
    assert {found[0] for found in sources.values()} == {n for n in dense if ".ffn." in n and n.startswith(
        ("layers.1.", "layers.3."))}  # every dense FFN tensor of the two layers has copies
    for name, (source,) in sources.items():
        assert moe[name] == dense[source], (name, source)
    assert [n for n, decayed in moe.items() if ".experts.b_" in n and decayed] == []
    for name, decayed in moe.items():
        if name in dense:
            assert decayed == dense[name], name
    assert moe["layers.1.ffn.moe.gate.gate.weight"] and not moe["layers.1.ffn.moe.gate.gate.bias"]
    assert dense["embedding.word_embeddings.weight"] and not dense["layers.0.ffn.value.bias"]


def _dense_ffn(ffn: int, hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"value.weight": torch.randn(ffn, hidden, generator=gen), "value.bias": torch.randn(ffn, generator=gen),
            "gate_proj.weight": torch.randn(ffn, hidden, generator=gen), "gate_proj.bias": torch.randn(ffn, generator=gen),
            "fc2.weight": torch.randn(hidden, ffn, generator=gen), "fc2.bias": torch.randn(hidden, generator=gen)}


@pytest.mark.parametrize("fraction", [0.25, 0.5, 1.0])
def test_drop_reinitialises_exactly_the_configured_fraction(fraction):
    model = ModelConfig(**TINY_GLM)
    moe = MoEConfig(layer_freq=1, num_experts=8, top_k=2, expert_hidden_size=96)
    dense = _dense_ffn(192, 64)
    base = upcycle_ffn(dense, model, moe, UpcycleConfig(mode="virtual_group", seed=0), layer=1)
    dropped = upcycle_ffn(dense, model, moe, UpcycleConfig(mode="drop", drop_fraction=fraction, seed=0), layer=1)
    expected = round(fraction * 96)
    unit_sets = []
    for e in range(8):
        value = (dropped["moe.experts.w_value_EFD"][e] != base["moe.experts.w_value_EFD"][e]).any(1)
        gate = (dropped["moe.experts.w_gate_proj_EFD"][e] != base["moe.experts.w_gate_proj_EFD"][e]).any(1)
        out = (dropped["moe.experts.w_out_EDF"][e] != base["moe.experts.w_out_EDF"][e]).any(0)
        assert int(value.sum()) == expected and torch.equal(value, gate) and torch.equal(value, out)
        assert torch.all(dropped["moe.experts.b_value_EF"][e][value] == 0)
        unit_sets.append(tuple(value.nonzero().flatten().tolist()))
    if 0 < fraction < 1:
        assert len(set(unit_sets)) > 1  # each expert drops its own units
    # The router and the kept units are those of the undropped conversion.
    assert torch.equal(dropped["moe.gate.gate.weight"], base["moe.gate.gate.weight"])


def test_virtual_group_layout_of_shards_and_router():
    model = ModelConfig(**TINY_GLM)
    moe = MoEConfig(layer_freq=1, num_experts=8, top_k=2, expert_hidden_size=96)
    dense = _dense_ffn(192, 64)
    out = upcycle_ffn(dense, model, moe, UpcycleConfig(seed=0), layer=0)
    router = out["moe.gate.gate.weight"]
    for e in range(8):
        shard = slice((e % 2) * 96, (e % 2 + 1) * 96)
        assert torch.equal(out["moe.experts.w_value_EFD"][e], dense["value.weight"][shard])
        assert torch.equal(out["moe.experts.w_gate_proj_EFD"][e], dense["gate_proj.weight"][shard])
        assert torch.equal(out["moe.experts.w_out_EDF"][e], 2 * dense["fc2.weight"][:, shard])
        assert torch.equal(router[e], router[e - e % 2])  # tied within the group
    assert not torch.equal(router[0], router[2])


def test_bad_inputs_give_clear_errors(tmp_path):
    model = ModelConfig(**TINY_GLM)
    # g = dense FFN / expert width, from moe.granularity or an absolute width; both give the same g.
    assert granularity(model, MoEConfig(layer_freq=1, num_experts=8, granularity=2), UpcycleConfig()) == 2
    assert granularity(model, MoEConfig(layer_freq=1, num_experts=8, expert_hidden_size=96), UpcycleConfig()) == 2
    with pytest.raises(UpcycleError, match="expert_hidden_size=100 does not divide model.ffn_hidden_size=192"):
        granularity(model, MoEConfig(layer_freq=1, num_experts=8, expert_hidden_size=100), UpcycleConfig())
    with pytest.raises(ConfigError, match="granularity=5 does not divide model.ffn_hidden_size=192"):
        granularity(model, MoEConfig(layer_freq=1, num_experts=10, granularity=5), UpcycleConfig())
    with pytest.raises(UpcycleError, match="not divisible by the granularity 2"):
        granularity(model, MoEConfig(layer_freq=1, num_experts=5, granularity=2), UpcycleConfig())
    with pytest.raises(UpcycleError, match=r"mode=copy .*\(granularity 2\).*moe.granularity=1"):
        granularity(model, MoEConfig(layer_freq=1, num_experts=8, granularity=2), UpcycleConfig(mode="copy"))
    with pytest.raises(UpcycleError, match="top_k=3 is not a multiple"):
        granularity(model, MoEConfig(layer_freq=1, num_experts=8, top_k=3, expert_hidden_size=96), UpcycleConfig())
    with pytest.raises(UpcycleError, match="softmax_before_topk"):
        granularity(model, MoEConfig(layer_freq=1, softmax_before_topk=True), UpcycleConfig(mode="copy"))
    with pytest.raises(UpcycleError, match="missing does not exist: pass a run.s checkpoints folder"):
        resolve_source(tmp_path / "missing")
    moe_ckpt = tmp_path / "moe" / "step_00000001"
    moe_ckpt.mkdir(parents=True)
    (moe_ckpt / "checkpoint.json").write_text(json.dumps({
        "format": 1, "config": {"model": TINY_GLM, "moe": {"layer_freq": 2, "num_experts": 4}}}))
    with pytest.raises(UpcycleError, match="already a MoE checkpoint"):
        load_dense(moe_ckpt, model, ParallelConfig())
    with pytest.raises(UpcycleError, match="upcycle.mode='sparse'"):
        UpcycleConfig(mode="sparse")


def test_sweep_plan_equal_extra_and_equal_total_compute(tmp_path):
    from moe_morpheus.config import ConfigError
    from moe_morpheus.upcycle.sweep import load_config, plan

    cfg = load_config([f"output_dir={tmp_path}", "seeds=[3]", "extra_fractions=[0.006]"])
    stages = {s.key: s.args for s in plan(cfg)}
    assert list(stages) == ["s3/dense", "s3/x0.006/dense_continued", "s3/x0.006/upcycled",
                            "s3/x0.006/scratch_extra", "s3/x0.006/scratch_total"]
    assert "budget.chinchilla_fraction=0.012" in stages["s3/dense"]
    assert f"init.from_dense={tmp_path}/s3/dense/checkpoints" in stages["s3/x0.006/upcycled"]
    assert "budget.chinchilla_fraction=0.006" in stages["s3/x0.006/scratch_extra"]
    assert "budget.chinchilla_fraction=0.018" in stages["s3/x0.006/scratch_total"]
    assert all("trainer.seed=3" in args for args in stages.values())
    with pytest.raises(ConfigError, match="must be positive"):
        load_config(["extra_fractions=[0.0]"])


def test_the_convert_command_names_a_missing_source_output_or_moe_target(tmp_path, capsys):
    from moe_morpheus.upcycle.__main__ import main

    assert main(["+experiment=upcycle_64e", f"convert.out={tmp_path}"]) == 2
    assert "no source: pass init.from_dense=PATH" in capsys.readouterr().err
    assert main(["+experiment=dense", f"init.from_dense={tmp_path}", f"convert.out={tmp_path}"]) == 2
    assert "the target has no MoE layer" in capsys.readouterr().err
    assert main(["+experiment=upcycle_64e", f"init.from_dense={tmp_path}"]) == 2
    assert "missing convert.out=..." in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written
