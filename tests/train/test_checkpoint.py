"""Checkpoints at the function level: resharding across TP / PP / EP (same loss, same continued
training, relative 1e-5), atomic files and rotation, and bad input (another model shape, a missing
directory, a truncated file, pickle payloads in .metadata and common.pt) with clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from moe_morpheus.config import (
    CheckpointConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.presets import TINY_GLM, TINY_MOE
from tests.helpers.synthetic import micro_batches


def _setup(tp: int, pp: int, ep: int, moe: dict | None, model: dict = TINY_GLM):
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel import initialize
    from moe_morpheus.train.optim import Optimizer
    from moe_morpheus.train.step import wrap_ddp

    model_cfg, moe_cfg = ModelConfig(**model), MoEConfig(**moe) if moe else None
    parallel = ParallelConfig(tp=tp, pp=pp, ep=ep)
    dp = initialize(parallel, model_cfg)
    chunks = wrap_ddp(build_model(model_cfg, moe_cfg, parallel, seed=5))
    # eps 1e-3: updates a smooth function of the gradient (tests/helpers/steps.py says why).
    optimizer = Optimizer(chunks, lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-3, grad_clip=1.0)
    return SimpleNamespace(model_cfg=model_cfg, moe_cfg=moe_cfg, parallel=parallel, dp=dp, chunks=chunks,
                           optimizer=optimizer)


def _mine(run, seed: int) -> list[dict]:
    """This rank's share of a global batch of 4 micro-batches x 2 rows."""
    from megatron.core import parallel_state

    batches = micro_batches(4, 2, TINY_GLM["seq_length"], TINY_GLM["vocab_size"], seed=seed)
    per_rank = len(batches) // run.dp
    rank = parallel_state.get_data_parallel_rank()
    return batches[rank * per_rank: (rank + 1) * per_rank]


def _train(run, seeds) -> list[float]:
    from moe_morpheus.moe import set_aux_loss_scale
    from moe_morpheus.train.step import forward_backward

    losses = []
    for seed in seeds:
        mine = _mine(run, seed)
        for chunk in run.chunks:
            chunk.zero_grad_buffer()
        set_aux_loss_scale(1.0 / (len(mine) * run.dp))
        losses.append(forward_backward(run.chunks, mine))
        run.optimizer.step()
    return losses


def _eval(run) -> float:
    from moe_morpheus.train.step import forward_backward

    return forward_backward(run.chunks, _mine(run, 99), forward_only=True)


def _save(run, directory: str, step: int) -> Path:
    from moe_morpheus.train.checkpoint import TrainState, layout, model_shape, save_checkpoint

    manifest = {"layout": layout(run.parallel), "model_shape": model_shape(run.model_cfg, run.moe_cfg)}
    return save_checkpoint(Path(directory), TrainState(step=step, consumed_samples=8 * step), run.chunks,
                           run.optimizer, manifest=manifest, keep=2, checksums=True)


def _load(run, path: Path):
    from moe_morpheus.train.checkpoint import layout, load_checkpoint, model_shape

    return load_checkpoint(path, run.chunks, run.optimizer, shape=model_shape(run.model_cfg, run.moe_cfg),
                           current_layout=layout(run.parallel))


def save_then_continue(tp, pp, ep, moe, directory):
    run = _setup(tp, pp, ep, moe)
    _train(run, [1, 2])
    _save(run, directory, 2)
    return _eval(run), _train(run, range(3, 8))


def load_then_continue(tp, pp, ep, moe, directory):
    from moe_morpheus.train.checkpoint import newest_valid

    run = _setup(tp, pp, ep, moe)
    state = _load(run, newest_valid(Path(directory), checksums=True))
    return state.step, _eval(run), _train(run, range(3, 8))


def _close(a: float, b: float, tol: float = 1e-5) -> bool:
    return abs(a - b) <= tol * abs(b)


def _assert_resharded(saved, loaded) -> None:
    ref_eval, ref_losses = saved[0]
    step, loss, losses = loaded[0]
    assert step == 2
    assert _close(loss, ref_eval), (loss, ref_eval)
    assert all(_close(a, b) for a, b in zip(losses, ref_losses, strict=True)), (losses, ref_losses)


@pytest.mark.slow
def test_dense_tp2_checkpoint_loads_at_tp1_and_at_pp2(tmp_path):
    saved = run_distributed(save_then_continue, 2, 2, 1, 1, None, str(tmp_path))
    _assert_resharded(saved, run_distributed(load_then_continue, 1, 1, 1, 1, None, str(tmp_path)))
    _assert_resharded(saved, run_distributed(load_then_continue, 2, 1, 2, 1, None, str(tmp_path)))


@pytest.mark.slow
def test_moe_ep2_checkpoint_loads_at_ep1(tmp_path):
    saved = run_distributed(save_then_continue, 2, 1, 1, 2, TINY_MOE, str(tmp_path))
    _assert_resharded(saved, run_distributed(load_then_continue, 1, 1, 1, 1, TINY_MOE, str(tmp_path)))


class _Payload:
    """Unpickling this runs code: it would create ``marker``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace a file and make checkpoint.json agree (a forged checkpoint, not a corrupt one)."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))


def _as_old_block_format(checkpoint: Path, copy: Path, config: dict | None = None) -> Path:
    """A copy of ``checkpoint`` as the code before GLM-130B's block order wrote it: no
    ``block_format`` in checkpoint.json (and ``config`` recorded as the trainer records it)."""
    shutil.copytree(checkpoint, copy)
    manifest = json.loads((copy / "checkpoint.json").read_text())
    del manifest["block_format"]
    if config is not None:
        manifest["config"] = config
    (copy / "checkpoint.json").write_text(json.dumps(manifest))
    return copy


def bad_inputs(directory: str) -> dict:
    from moe_morpheus.train import safe_load
    from moe_morpheus.train.checkpoint import (
        Checkpointer,
        CheckpointError,
        layout,
        load_model_weights,
        model_shape,
        newest_valid,
        verify_checkpoint,
    )
    from moe_morpheus.train.checkpoint.store import complete_checkpoints

    root = Path(directory)
    run = _setup(1, 1, 1, None)
    _train(run, [1])
    first = _save(run, directory, 1)
    _train(run, [2])
    second = _save(run, directory, 2)
    out = {"listed": [p.name for p in complete_checkpoints(root)], "latest": (root / "latest").read_text().strip()}

    other = _setup(1, 1, 1, None, dict(TINY_GLM, hidden_size=128))
    try:
        _load(other, second)
    except CheckpointError as error:
        out["shape"] = str(error)

    manifest = {"config": {}, "layout": layout(run.parallel), "model_shape": model_shape(run.model_cfg, MoEConfig())}

    def resume(path: Path):
        return Checkpointer(CheckpointConfig(resume=str(path)), run.chunks, run.optimizer, directory=root,
                            manifest=manifest).resume()

    try:
        resume(root / "missing")
    except CheckpointError as error:
        out["missing"] = str(error)

    shard = second / "__0_0.distcp"
    os.truncate(shard, shard.stat().st_size // 2)
    out["truncated"] = verify_checkpoint(second, checksums=True)
    out["fallback"] = newest_valid(root, checksums=True).name
    try:
        resume(second)
    except CheckpointError as error:
        out["explicit_truncated"] = str(error)

    for name, data in ((".metadata", pickle.dumps(_Payload(str(root / "pwned_metadata")))),
                       ("common.pt", None)):
        forged = root / f"forged_{name.strip('.')}"
        shutil.copytree(first, forged)
        if data is None:  # a torch.save'd common state with the payload inside
            path = forged / name
            torch.save({"trainer": _Payload(str(root / "pwned_common"))}, path)
            data = path.read_bytes()
        _rewrite(forged, name, data)
        try:
            _load(run, forged)
        except safe_load.UnsafeCheckpointError as error:
            out[f"unsafe{name}"] = str(error)
    out["markers"] = sorted(p.name for p in root.glob("pwned_*"))

    # Checkpoints of the old block order: post-LN ones are refused by every loader, pre-LN ones load.
    old = _as_old_block_format(first, root / "old_deepnorm")
    for name, load in (("resume", lambda: _load(run, old)), ("weights", lambda: load_model_weights(old, run.chunks))):
        try:
            load()
        except CheckpointError as error:
            out[f"old_deepnorm_{name}"] = str(error)
    pre = _setup(1, 1, 1, None, dict(TINY_GLM, norm="pre_ln"))
    _train(pre, [1])
    saved = {name: param.detach().clone() for name, param in pre.chunks[0].named_parameters()}
    pre_first = _save(pre, str(root / "pre_ln"), 1)
    _train(pre, [2])  # the weights move away from the saved ones
    old_pre = _as_old_block_format(pre_first, root / "old_pre_ln", {"model": {"norm": "pre_ln"}})
    out["old_pre_ln_step"] = _load(pre, old_pre).step
    out["old_pre_ln_restored"] = all(torch.equal(param, saved[name])
                                     for name, param in pre.chunks[0].named_parameters())
    # The checkpoint's recorded norm decides, not the loading model's.
    old_post = _as_old_block_format(pre_first, root / "old_recorded_deepnorm", {"model": {"norm": "deepnorm"}})
    try:
        load_model_weights(old_post, pre.chunks)
    except CheckpointError as error:
        out["old_recorded_deepnorm"] = str(error)
    return out


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return run_distributed(bad_inputs, 1, str(tmp_path_factory.mktemp("bad")))[0]


@pytest.mark.slow
def test_saves_are_listed_newest_first_with_a_latest_pointer(bad):
    assert bad["listed"] == ["step_00000002", "step_00000001"] and bad["latest"] == "step_00000002"


@pytest.mark.slow
def test_another_model_shape_is_refused_naming_the_field(bad):
    assert "model.hidden_size: checkpoint 64, this run 128" in bad["shape"]
    assert "model.ffn_hidden_size: checkpoint 192, this run 384" in bad["shape"]


@pytest.mark.slow
def test_a_missing_directory_is_named(bad):
    assert "no such directory" in bad["missing"] and bad["missing"].endswith("missing: no such directory")


@pytest.mark.slow
def test_a_truncated_file_is_detected_skipped_for_auto_and_refused_when_asked_for(bad):
    assert len(bad["truncated"]) == 1 and "__0_0.distcp has" in bad["truncated"][0]
    assert "(truncated or overwritten)" in bad["truncated"][0]
    assert bad["fallback"] == "step_00000001"
    assert "cannot be used" in bad["explicit_truncated"] and "__0_0.distcp" in bad["explicit_truncated"]


@pytest.mark.slow
@pytest.mark.parametrize("name,referred", [(".metadata", "builtins.exec"), ("common.pt", "")])
def test_a_pickle_payload_is_refused_and_runs_nothing(bad, name, referred):
    message = bad[f"unsafe{name}"]
    assert message.startswith("refusing to load") and name in message and referred in message
    assert "nothing was executed" in message
    assert bad["markers"] == []


@pytest.mark.slow
@pytest.mark.parametrize("key", ["old_deepnorm_resume", "old_deepnorm_weights", "old_recorded_deepnorm"])
def test_a_post_ln_checkpoint_of_the_old_block_order_is_refused(bad, key):
    message = bad[key]
    assert "\n" not in message and "was written with the old DeepNorm order (LN after the residual" in message
    assert "model.norm=deepnorm" in message and "cannot be loaded into the GLM-130B block" in message
    assert "retrain it" in message


@pytest.mark.slow
def test_a_pre_ln_checkpoint_of_the_old_block_order_loads(bad):
    assert bad["old_pre_ln_step"] == 1 and bad["old_pre_ln_restored"]


def test_an_old_recorded_config_merges_into_the_current_schema():
    """Checkpoints from before moe.granularity recorded upcycle.granularity, a key the schema no
    longer has: generate/evaluate merge the recorded config into ExperimentConfig and failed on it."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from moe_morpheus.config.experiment import ExperimentConfig
    from moe_morpheus.train.checkpoint import recorded_config

    old = {"model": {"norm": "pre_ln"}, "moe": {"num_experts": 8, "expert_hidden_size": 192},
           "upcycle": {"mode": "virtual_group", "granularity": 2}}
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(OmegaConf.structured(ExperimentConfig), old)
    config = recorded_config({"config": old})
    merged = OmegaConf.merge(OmegaConf.structured(ExperimentConfig), config)
    assert merged.moe.expert_hidden_size == 192 and merged.upcycle.mode == "virtual_group"
    assert old["upcycle"]["granularity"] == 2  # the manifest itself is left as it was


def _as_format_1(entries: dict) -> dict:
    """Model entries under checkpoint format 1's names: the GeGLU's gate projection was ``gelu``."""
    import dataclasses

    return {name: dataclasses.replace(entry, key=entry.key.replace(".gate_proj.", ".gelu.").replace("_gate_proj_", "_gelu_"))
            for name, entry in entries.items()}


def save_format_1_then_continue(moe, directory):
    """Save as the code before the GeGLU rename did (format 1, ``gelu`` names), then train on."""
    import torch.distributed as dist
    from torch.distributed.checkpoint import FileSystemReader

    from moe_morpheus.train.checkpoint import state

    run = _setup(1, 1, 1, moe)
    _train(run, [1, 2])
    current = state.model_entries
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(state, "model_entries", lambda model: _as_format_1(current(model)))
        path = _save(run, directory, 2)
    if dist.get_rank() == 0:
        manifest = json.loads((path / "checkpoint.json").read_text())
        (path / "checkpoint.json").write_text(json.dumps({**manifest, "format": 1}))
    dist.barrier()
    keys = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return sorted(k for k in keys if "gelu" in k), _eval(run), _train(run, range(3, 8))


@pytest.mark.slow
def test_a_checkpoint_with_the_old_geglu_names_loads(tmp_path):
    """Format 1 named the GeGLU's gate projection ``gelu`` (dense ``ffn.gelu``, experts
    ``w_gelu_EFD`` / ``b_gelu_EF``): its weights and AdamW moments load under today's names and
    training goes on as it did after the save."""
    ((old_keys, *saved),) = run_distributed(save_format_1_then_continue, 1, TINY_MOE, str(tmp_path))
    assert {"layers.0.ffn.gelu.weight", "layers.1.ffn.moe.experts.w_gelu_EFD",
            "optimizer.exp_avg.layers.1.ffn.moe.experts.b_gelu_EF"} <= set(old_keys)
    _assert_resharded([saved], run_distributed(load_then_continue, 1, 1, 1, 1, TINY_MOE, str(tmp_path)))
