"""Differentiable collectives of the MoE layer: token exchange and tensor-parallel slicing.

Shape legend: T tokens, D model dim, W ranks of the expert-parallel group, E local experts,
S ranks of the slice group.

All three work on gloo (CPU) and NCCL alike: gloo's ``all_to_all_single`` needs contiguous
tensors and explicit split sizes, which is what is passed here on every backend.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def exchange_counts(send_counts_WE: torch.Tensor, group) -> torch.Tensor:
    """``recv[j, e]`` = rows rank j sends to this rank's local expert e (FastMoE's
    ``expert_exchange``): one all-to-all of E-sized blocks, before the token exchange so that
    every rank knows its receive split sizes."""
    recv_WE = torch.empty_like(send_counts_WE)
    dist.all_to_all_single(recv_WE, send_counts_WE.contiguous(), group=group)
    return recv_WE


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with explicit splits; backward sends the gradients back the same
    way (the splits swapped)."""

    @staticmethod
    def forward(ctx, x_ND, recv_splits: list[int], send_splits: list[int], group):
        ctx.splits, ctx.group = (recv_splits, send_splits), group
        out = x_ND.new_empty(sum(recv_splits), *x_ND.shape[1:])
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_ND):
        recv_splits, send_splits = ctx.splits
        grad_in = grad_ND.new_empty(sum(send_splits), *grad_ND.shape[1:])
        dist.all_to_all_single(grad_in, grad_ND.contiguous(), send_splits, recv_splits, group=ctx.group)
        return grad_in, None, None, None


def slice_bounds(num_tokens: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [start, end) of slice rank ``rank``: chunks of ceil(T / S) rows, the last ones
    shorter or empty. FastMoE uses T // S and drops the remainder; here every row is routed."""
    chunk = math.ceil(num_tokens / size)
    start = min(rank * chunk, num_tokens)
    return start, min(start + chunk, num_tokens)


def _gather_rows(x_local: torch.Tensor, num_tokens: int, group) -> torch.Tensor:
    """Concatenate every rank's slice (sizes from :func:`slice_bounds`) into [T, ...]. Slices
    are padded to the chunk size because ``all_gather`` needs equal shapes."""
    size = dist.get_world_size(group)
    chunk = math.ceil(num_tokens / size)
    padded = x_local.new_zeros(chunk, *x_local.shape[1:])
    padded[: x_local.shape[0]] = x_local
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat(parts)[:num_tokens]


class Slice(torch.autograd.Function):
    """Forward: this rank's slice of rows identical on all slice ranks. Backward: all-gather the
    slice gradients, so each rank gets the full (identical) input gradient."""

    @staticmethod
    def forward(ctx, x_TD, group):
        ctx.group, ctx.num_tokens = group, x_TD.shape[0]
        start, end = slice_bounds(x_TD.shape[0], dist.get_rank(group), dist.get_world_size(group))
        return x_TD[start:end].clone()

    @staticmethod
    def backward(ctx, grad_local):
        return _gather_rows(grad_local, ctx.num_tokens, ctx.group), None


class AllGather(torch.autograd.Function):
    """Forward: concatenate the slices of all slice ranks into [T, ...]. Backward: this rank's
    rows of the gradient (the others' rows belong to the other ranks' graphs)."""

    @staticmethod
    def forward(ctx, x_local, num_tokens: int, group):
        ctx.group, ctx.num_tokens = group, num_tokens
        return _gather_rows(x_local, num_tokens, group)

    @staticmethod
    def backward(ctx, grad_TD):
        start, end = slice_bounds(ctx.num_tokens, dist.get_rank(ctx.group), dist.get_world_size(ctx.group))
        return grad_TD[start:end].contiguous(), None, None
