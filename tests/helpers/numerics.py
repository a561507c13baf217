"""Comparisons against a reference: the relative error every equality test states its tolerance in,
and the gradients of a (tensor-parallel) model by global parameter name."""

from __future__ import annotations

import torch


def relative_error(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max|a - ref| / max|ref| in fp64; a zero reference leaves only an exact match at 0."""
    a, ref = a.double(), ref.double()
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def full_gradients(chunks) -> dict[str, torch.Tensor]:
    """Gradients by global parameter name, tensor-parallel shards gathered."""
    from moe_morpheus.parallel.gather import gather_full

    return gather_full(chunks, lambda param: param.main_grad)
