"""Distributed checkpoints: atomic save, validation, resume, rotation.

Format: Megatron-Core ``dist_checkpointing`` (torch_dist): every rank writes its own shards and
every key names a global tensor with global offsets (``GLMModel.sharded_state_dict``), so a
checkpoint loads into any TP / PP / EP layout of the same model (resharding). Contents:

- ``model``: the parameters; ``optimizer``: AdamW's ``exp_avg`` / ``exp_avg_sq``, sharded like
  their parameters (so they reshard too); AdamW's step count, the same for every parameter
  (each applied update moves all of them), is kept once in the trainer state;
- ``trainer`` (common, written by rank 0): :class:`TrainState`: steps, consumed samples (the
  data position; sample i depends only on (seed, i)), tokens, FLOPs, guard state, MoE load
  totals, the MLflow run id;
- ``rng``: every rank's RNG states (torch CPU and CUDA, Megatron's model-parallel tracker,
  Python's ``random``), restored when the layout is unchanged; after a layout change the ranks
  are different processes, and their streams restart from the seed (with a warning).

``checkpoint.dir`` (default ``<run output dir>/checkpoints``)::

    step_00000020/        a complete checkpoint: Megatron's files (.metadata, __<rank>_<i>.distcp,
                          common.pt, metadata.json) and ours, checkpoint.json (config, layout,
                          model shape, block format, step, size and SHA-256 of every file),
                          written last
    latest                "step_00000020": replaced atomically after each save
    .tmp-step_00000030/   a save in progress, or one that was killed: never loaded, removed at the
                          next start

Atomicity: a save writes into ``.tmp-<name>``; after every rank has finished (barrier) rank 0
writes checkpoint.json, fsyncs, renames the folder to ``<name>`` (atomic on POSIX) and then
replaces ``latest`` (write + rename). Checkpoints beyond ``checkpoint.keep`` are renamed to
``.trash-*`` before removal, so a kill in the middle never leaves half a checkpoint under a
valid name.

Resume (``checkpoint.resume=auto``, the default): the newest ``step_*`` whose checkpoint.json
matches every file (size, and SHA-256 when ``checkpoint.checksums``) is loaded; a partial or
corrupt one is skipped for the previous with a warning, never loaded. The MLflow run id in it
reopens the same MLflow run. **To resume a run, start it again with its run folder**::

    python train.py +experiment=moe_8e hydra.run.dir=outputs/moe_8e/2025-01-01_10-00-00-000000

(``checkpoint.dir=outputs/moe_8e/<run>/checkpoints`` works too, with new outputs in a new
folder). Under ``torchrun --max-restarts=K`` the run folder is the same across restarts by
itself (train.py), so a restarted job resumes without anyone passing anything.
``checkpoint.resume=<path>`` starts from a given checkpoint folder, or from the newest valid
one in a given checkpoints folder (another run's, another layout). Loading never runs code
from the files (moe_morpheus.train.safe_load).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.validation import StrictHandling

from moe_morpheus.config import ModelConfig, MoEConfig, ParallelConfig
from moe_morpheus.model.layer import BLOCK_FORMAT
from moe_morpheus.parallel.gather import unwrap
from moe_morpheus.train import safe_load
from moe_morpheus.train.checkpoint.store import (
    FORMAT_VERSION,
    LATEST,
    MANIFEST,
    CheckpointError,
    checkpoint_name,
    complete_checkpoints,
    fsync_dir,
    gather_dicts,
    gather_lists,
    list_files,
    my_share,
    read_manifest,
    remove_checkpoint,
    sha256,
    stored_key,
    write_atomic,
)
from moe_morpheus.train.optim import MOMENTS

log = logging.getLogger(__name__)

@dataclass
class TrainState:
    """Where a run stands after ``step`` completed steps (the trainer state of a checkpoint)."""

    step: int = 0
    consumed_samples: int = 0
    tokens: int = 0
    flops: float = 0.0
    run_id: str | None = None
    guards: dict = field(default_factory=dict)
    moe_load: dict = field(default_factory=dict)
    # A run started from a dense checkpoint (moe_morpheus.upcycle.upcycle_into): the source run,
    # checkpoint, its tokens and FLOPs (sunk compute) and the conversion mode; kept by every save.
    lineage: dict = field(default_factory=dict)
    # Supervised target tokens (loss-mask positions) trained on, summed over micro-batches and
    # data-parallel ranks. None: a checkpoint written before they were counted (recounted on load).
    target_tokens: int | None = None


def model_shape(model: ModelConfig, moe: MoEConfig | None) -> dict:
    """What must match for a checkpoint's tensors to fit a model (the layout may differ)."""
    shape = {"model.num_layers": model.num_layers, "model.hidden_size": model.hidden_size,
             "model.num_attention_heads": model.num_attention_heads,
             # The resolved width (the field may be None: derived), under the key manifests hold.
             "model.ffn_hidden_size": model.ffn_hidden, "model.padded_vocab_size": model.padded_vocab_size}
    if moe is not None and moe.enabled:
        shape.update({f"moe.{k}": getattr(moe, k) for k in ("layer_freq", "num_experts")})
        # The resolved width: a granularity and the absolute size it equals make the same tensors.
        shape["moe.expert_hidden_size"] = moe.expert_hidden(model)
    return shape


def layout(parallel: ParallelConfig) -> dict:
    return {"tp": parallel.tp, "pp": parallel.pp, "virtual_pp": parallel.vpp, "ep": parallel.ep,
            "world_size": dist.get_world_size()}


# ---------------------------------------------------------------------- sharded state dicts
def model_entries(model: list[torch.nn.Module], fmt: int = FORMAT_VERSION) -> dict[str, ShardedTensor]:
    """This rank's model entries over all its pipeline chunks (keys are global already), keyed as a
    checkpoint of format ``fmt`` stores them (the optimizer's moments follow their parameter's key)."""
    entries: dict[str, ShardedTensor] = {}
    for chunk in model:
        entries.update(unwrap(chunk).sharded_state_dict())
    if fmt != FORMAT_VERSION:
        entries = {name: dataclasses.replace(entry, key=stored_key(entry.key, fmt)) for name, entry in entries.items()}
    return entries


def optimizer_entries(model_sd: dict[str, ShardedTensor], optimizer) -> dict[str, ShardedTensor]:
    """AdamW moments, whole per parameter shard (``moments_like_params``: ZeRO-1's chunks are
    gathered), as sharded tensors with their parameter's key, offsets and replica id: so they
    reshard like the parameters, with or without ZeRO-1. Collective under ZeRO-1."""
    moments = optimizer.moments_like_params()
    by_param = {id(entry.data): (name, entry) for name, entry in model_sd.items()}
    entries = {}
    for param in optimizer.params:
        name, entry = by_param[id(param)]
        for moment, value in moments[param].items():
            entries[f"{moment}.{name}"] = dataclasses.replace(entry, key=f"optimizer.{moment}.{entry.key}", data=value)
    return entries


def adam_step(optimizer) -> int:
    try:
        return optimizer.step_count()
    except ValueError as error:
        raise CheckpointError(str(error)) from None


def _rng_states() -> dict:
    states = {"torch_cpu": torch.get_rng_state(), "python": random.getstate(),
              "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch_cpu"])
    random.setstate(states["python"])
    tensor_parallel.get_cuda_rng_tracker().set_states(states["tracker"])
    if "torch_cuda" in states:
        torch.cuda.set_rng_state(states["torch_cuda"])


def _rng_entry(data) -> ShardedObject:
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng", data, (world,), (rank,), replica_id=0)


class _InProcessSave(TorchDistSaveShardedStrategy):
    """torch_dist format written synchronously by this process. Megatron's own writer starts a
    spawned multiprocessing Manager on the first save (5.1 s here, and scripts must guard
    ``__main__``) and forks a writer per file; PyTorch DCP's FileSystemWriter writes the same
    files in 0.06 s for the test model. Same translation and planner as Megatron's strategy."""

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        import torch.distributed.checkpoint as dcp

        state_dict, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, self.keep_only_main_replica)
        dcp.save(mcore_to_pyt_state_dict(state_dict, False),
                 storage_writer=dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1),
                 planner=MCoreSavePlanner(dedup_replicated_tensors=not self.keep_only_main_replica,
                                          flatten_state_dict=False))


# ---------------------------------------------------------------------- save / load
def save_checkpoint(directory: Path, state: TrainState, model: list[torch.nn.Module], optimizer, *,
                    manifest: dict, keep: int, checksums: bool, during_save=None) -> Path:
    """Write the checkpoint of ``state.step`` atomically (module docstring). Collective.

    ``manifest``: config, layout and model shape to record; ``during_save(step)`` is called when
    the shards are written and nothing is renamed yet (fault injection).
    """
    directory = Path(directory)
    name = checkpoint_name(state.step)
    tmp, final = directory / f".tmp-{name}", directory / name
    run_id = [state.run_id]
    dist.broadcast_object_list(run_id, src=0)  # only rank 0 has the MLflow run
    state = dataclasses.replace(state, run_id=run_id[0])
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    dist.barrier()
    model_sd = model_entries(model)
    sharded = {
        "model": model_sd,
        "optimizer": optimizer_entries(model_sd, optimizer),
        "rng": _rng_entry(_rng_states()),
        "trainer": dataclasses.asdict(state),
        "adam_step": adam_step(optimizer),
    }
    dist_checkpointing.save(sharded, str(tmp), sharded_strategy=_InProcessSave("torch_dist", 1))
    dist.barrier()
    if during_save is not None:
        during_save(state.step)
    names = list_files(tmp)
    hashes = gather_dicts({n: sha256(tmp / n) for n in my_share(names)} if checksums else {})
    if dist.get_rank() == 0:
        files = {n: {"size": (tmp / n).stat().st_size, **({"sha256": hashes[n]} if checksums else {})}
                 for n in names}
        record = {"format": FORMAT_VERSION, "block_format": BLOCK_FORMAT, "step": state.step,
                  "consumed_samples": state.consumed_samples,
                  "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **manifest, "files": files}
        write_atomic(tmp / MANIFEST, json.dumps(record, indent=1, default=str))
        fsync_dir(tmp)
        if final.exists():  # an older, replaced attempt at the same step (after a rollback)
            remove_checkpoint(final)
        os.rename(tmp, final)
        fsync_dir(directory)
        write_atomic(directory / LATEST, name + "\n")
        for old in complete_checkpoints(directory)[keep:]:
            remove_checkpoint(old)
    dist.barrier()
    return final


def _check_shape(path: Path, recorded: dict, expected: dict) -> None:
    mismatches = [f"{k}: checkpoint {recorded.get(k)!r}, this run {v!r}" for k, v in expected.items()
                  if recorded.get(k) != v]
    mismatches += [f"{k}: checkpoint {v!r}, this run has none" for k, v in recorded.items() if k not in expected]
    if mismatches:
        raise CheckpointError(f"checkpoint {path} was written for another model shape: " + "; ".join(mismatches))


def loadable_manifest(path: Path, model: list[torch.nn.Module]) -> dict:
    """The manifest of checkpoint ``path``, if its parameters mean in this code's layer what they
    meant when saved; every loader (resume, rollback, inference, export, upcycling) reads it here.

    Post-LN checkpoints without ``block_format`` come from layers that computed
    ``x = LN(alpha x + F(x))`` per sub-layer: in GLM-130B's order (model/layer.py) the same
    tensors compute another function, so they are refused. Pre-LN layers did not change. The
    norm is the checkpoint's own (its recorded config; the loading model's when none is recorded).
    """
    manifest = read_manifest(path)
    recorded = manifest.get("block_format")
    if recorded == BLOCK_FORMAT:
        return manifest
    if recorded is not None:
        raise CheckpointError(f"checkpoint {path} has block format {recorded!r}; this code reads {BLOCK_FORMAT!r}")
    if "config" in manifest:
        norm = manifest["config"].get("model", {}).get("norm", ModelConfig.norm)
    else:
        norm = unwrap(model[0]).model_cfg.norm
    if norm != "pre_ln":
        raise CheckpointError(f"checkpoint {path} was written with the old DeepNorm order (LN after the residual, "
                              f"model.norm={norm}); it cannot be loaded into the GLM-130B block ({BLOCK_FORMAT}): "
                              f"retrain it, or load it with a moe_morpheus commit from before the change (06b5da3)")
    return manifest


def load_checkpoint(path: Path, model: list[torch.nn.Module], optimizer, *, shape: dict,
                    current_layout: dict) -> TrainState:
    """Load model, optimizer, trainer state (and RNG states when the layout is the same) from
    ``path`` into this rank's shards. Collective. Raises :class:`CheckpointError` naming what
    does not match; refuses pickle payloads (safe_load)."""
    path = Path(path)
    manifest = loadable_manifest(path, model)
    _check_shape(path, manifest.get("model_shape", {}), shape)
    safe_load.install()
    model_sd = model_entries(model, manifest["format"])
    request = {"model": model_sd, "optimizer": optimizer_entries(model_sd, optimizer)}
    same_layout = manifest.get("layout") == current_layout
    if same_layout:
        request["rng"] = _rng_entry(None)
    # The load replaces the request's entries by plain tensors: take the targets first.
    params = {name: entry.data for name, entry in model_sd.items()}
    key_of = {id(param): name for name, param in params.items()}
    # Megatron's naming: "unexpected" = requested here but absent from the checkpoint (per rank).
    loaded, _, unexpected = dist_checkpointing.load(request, str(path), strict=StrictHandling.RETURN_ALL)
    absent = sorted(set().union(*gather_lists(sorted(unexpected))))
    if absent:
        raise CheckpointError(f"checkpoint {path} lacks {len(absent)} tensors this model needs, e.g. {absent[:3]}")
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(loaded["model"][name])
        moments = {param: {m: loaded["optimizer"][f"{m}.{key_of[id(param)]}"] for m in MOMENTS}
                   for param in optimizer.params}
    optimizer.load_moments(moments, loaded["adam_step"])
    if same_layout:
        _set_rng_states(loaded["rng"])
    else:
        log.warning("checkpoint %s was written with layout %s, this run is %s: weights and optimizer state are "
                    "resharded; RNG streams restart from the seed", path, manifest.get("layout"), current_layout)
    return TrainState(**loaded["trainer"])


def load_model_weights(path: Path, model: list[torch.nn.Module]) -> dict:
    """Only the parameters of checkpoint ``path`` into ``model`` (any layout; no optimizer, no RNG),
    for inference, export and upcycling. Returns the checkpoint's trainer state (a dict).
    Collective; refuses pickle payloads (safe_load)."""
    manifest = loadable_manifest(Path(path), model)
    safe_load.install()
    entries = model_entries(model, manifest["format"])
    targets = {name: entry.data for name, entry in entries.items()}
    loaded = dist_checkpointing.load({"model": entries}, str(path))
    with torch.no_grad():
        for name, param in targets.items():
            param.copy_(loaded["model"][name])
    return loaded.get("trainer", {})


def recount_targets(state: TrainState, count) -> int | None:
    """Target tokens trained on up to a checkpoint written before they were counted, exactly or
    not at all. ``count(start, end)``: target tokens of training rows [start, end).

    A run from scratch trained rows [0, consumed_samples) less the ranges its rollbacks skipped
    (``guards.skipped_ranges``; the trainer's live count leaves them out too). A run started from
    a dense checkpoint began at the dense run's data position, which its old checkpoints do not
    record: None (no ``target_tokens_*`` logged for it), with a warning."""
    if state.lineage:
        log.warning("checkpoint at step %d of a run started from a dense checkpoint predates target-token "
                    "counting and does not record where this run's data began: target_tokens_seen is not "
                    "logged for this run", state.step)
        return None
    total, start = 0, 0
    for first, end in sorted(map(tuple, state.guards.get("skipped_ranges", []))):
        total += count(start, first) if first > start else 0
        start = max(start, end)
    return total + (count(start, state.consumed_samples) if state.consumed_samples > start else 0)


