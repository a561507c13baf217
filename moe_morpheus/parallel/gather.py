"""Whole tensors by layout-independent name, gathered from any TP / PP / EP layout.

Names are the module's parameter names with local layer indices replaced by global ones
(``layers.{i}`` of a pipeline chunk -> its global layer), so one layout's tensors can be compared
with, or loaded into, another's. Tensor-parallel shards are concatenated along their partition
dimension, expert-parallel shards along the expert dimension (dim 0 of the batched expert
weights); the tied output weight kept on the last pipeline stage is a copy and is left out.
Every rank returns the tensors of the chunks it holds; merge the dicts of all ranks for the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model chunk inside a DDP wrapper (or the chunk itself)."""
    return chunk.module if hasattr(chunk, "module") else chunk


def global_name(module: torch.nn.Module, name: str) -> str:
    parts = name.split(".")
    if parts[0] == "layers":
        parts[1] = str(module.layer_indices[int(parts[1])])
    return ".".join(parts)


def _all_gather(tensor: torch.Tensor, group, dim: int) -> torch.Tensor:
    shards = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shards, tensor.contiguous(), group=group)
    return torch.cat(shards, dim=dim)


def gather_full(chunks, tensor_of: Callable[[torch.nn.Parameter], torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensor_of(param)`` (the parameter, its ``main_grad``, ...) of every parameter, whole."""
    tp_group = parallel_state.get_tensor_model_parallel_group()
    ep_group = parallel_state.get_expert_model_parallel_group()
    tp, ep = dist.get_world_size(tp_group), dist.get_world_size(ep_group)
    out = {}
    for chunk in chunks:
        module = unwrap(chunk)
        for name, param in module.named_parameters():
            if name.startswith("output_layer"):
                continue
            value = tensor_of(param).detach().clone()
            if not getattr(param, "allreduce", True) and ep > 1:
                value = _all_gather(value, ep_group, dim=0)
            elif getattr(param, "tensor_model_parallel", False) and tp > 1:
                value = _all_gather(value, tp_group, dim=param.partition_dim)
            out[global_name(module, name)] = value
    return out
