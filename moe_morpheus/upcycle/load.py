"""The distributed side of upcycling: read a dense checkpoint whole in this run's layout, convert it
(moe_morpheus/upcycle/convert.py) and slice the result into this rank's TP / EP shards."""

from __future__ import annotations

from pathlib import Path

import torch

from moe_morpheus.config import ModelConfig
from moe_morpheus.config.upcycle import UpcycleError, granularity
from moe_morpheus.parallel.gather import unwrap
from moe_morpheus.upcycle.convert import upcycle_tensors


def load_whole(chunks, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors by global name into this rank's shards (inverse of gather_full): expert
    tensors sliced along dim 0 over EP, tensor-parallel ones along their partition dim; the
    last stage's output layer (tied) takes the word embedding."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from moe_morpheus.parallel.gather import global_name

    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    tp, tp_rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    ep, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    embedding = next(k for k in tensors if "word_embeddings" in k)
    wanted = set()
    with torch.no_grad():
        for chunk in chunks:
            module = unwrap(chunk)
            for name, param in module.named_parameters():
                key = embedding if name.startswith("output_layer") else global_name(module, name)
                wanted.add(key)
                if key not in tensors:
                    raise UpcycleError(f"the converted model has no tensor {key!r} for this model's parameter {name}")
                whole = tensors[key]
                if not getattr(param, "allreduce", True) and ep > 1:
                    whole = whole.chunk(ep, dim=0)[ep_rank]
                elif getattr(param, "tensor_model_parallel", False) and tp > 1:
                    whole = whole.chunk(tp, dim=param.partition_dim)[tp_rank]
                if whole.shape != param.shape:
                    raise UpcycleError(f"{key}: converted shard {tuple(whole.shape)} does not fit the parameter "
                                       f"{tuple(param.shape)}")
                param.copy_(whole)


def resolve_source(path: str | Path, *, checksums: bool = True) -> Path:
    """The dense checkpoint folder to read: ``path`` itself (a step_* folder, verified) or the
    newest valid checkpoint inside it. Collective."""
    from moe_morpheus.train.checkpoint import CheckpointError, find_checkpoint

    try:
        return find_checkpoint(path, checksums=checksums)
    except CheckpointError as error:
        raise UpcycleError(f"init.from_dense={path}: {error}") from None


def load_dense(path: Path, model: ModelConfig, parallel) -> tuple[dict[str, torch.Tensor], dict]:
    """Whole tensors and the trainer state of the dense checkpoint at ``path``, read through a
    dense model of this run's layout. Collective; raises UpcycleError for a MoE source or
    another model shape."""
    from moe_morpheus.inference.export import configs_from_manifest
    from moe_morpheus.model import build_model
    from moe_morpheus.parallel.gather import gather_full
    from moe_morpheus.train.checkpoint import load_model_weights, model_shape, read_manifest

    manifest = read_manifest(path)
    source_model, source_moe, _ = configs_from_manifest(manifest)
    if source_moe is not None:
        raise UpcycleError(f"{path} is already a MoE checkpoint (moe.layer_freq={source_moe.layer_freq}, "
                           f"{source_moe.num_experts} experts): upcycling starts from a dense model")
    recorded, expected = manifest.get("model_shape", {}), model_shape(model, None)
    mismatches = [f"{k}: checkpoint {recorded.get(k)!r}, target {v!r}" for k, v in expected.items()
                  if recorded.get(k) != v]
    if mismatches:
        raise UpcycleError(f"dense checkpoint {path} does not match the target model (pass the dense run's "
                           f"model.* settings): " + "; ".join(mismatches))
    chunks = build_model(source_model, None, parallel)
    trainer = load_model_weights(path, chunks)
    return gather_full(chunks, lambda p: p), trainer


def upcycle_into(chunks, exp, source: str | Path):
    """Convert the dense checkpoint ``source`` into this rank's ``chunks`` of ``exp``'s model;
    return the :class:`TrainState` to start from (step 0, the dense data position, lineage).
    Collective."""
    from moe_morpheus.train.checkpoint import TrainState

    path = resolve_source(source, checksums=exp.checkpoint.checksums)
    moe = exp.moe_or_none
    if moe is not None:
        granularity(exp.model, moe, exp.upcycle)  # fail before loading anything
    dense, trainer = load_dense(path, exp.model, exp.parallel)
    load_whole(chunks, upcycle_tensors(dense, exp.model, moe, exp.upcycle_config()))
    lineage = {"kind": "upcycled" if moe is not None else "continued", "from_run": trainer.get("run_id"),
               "from_checkpoint": str(path.resolve()), "tokens": int(trainer.get("tokens", 0)),
               "flops": float(trainer.get("flops", 0.0)), "steps": int(trainer.get("step", 0)),
               "mode": exp.upcycle.mode if moe is not None else "continue",
               # None: the dense checkpoint predates target-token counting.
               "target_tokens": trainer.get("target_tokens")}
    return TrainState(consumed_samples=int(trainer.get("consumed_samples", 0)), lineage=lineage, target_tokens=0)
