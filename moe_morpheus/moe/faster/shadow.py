"""FasterMoE's dynamic shadowing: replicate hot experts instead of sending their tokens
(FasterMoE, PPoPP'22, sec. 4; docs/design.md#fastermoe).

Shape legend: S shadowed experts, P parameters of one expert, N rows, D model dim, E local
experts.

Forward: the owner of each shadowed expert (rank g // E) flattens its parameters into one
[P] row; one broadcast per owner (its shadowed experts are consecutive in the sorted list)
gives every rank the [S, P] buffer, and every rank runs its own tokens of those experts on it.
Backward: the [S, P] gradient is reduced (SUM) to each owner, which adds it to its
parameters' gradients, as FastMoE does; autograd sums it with the gradient of the owner's
regular path.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.func import functional_call

from moe_morpheus.moe.experts import GeGLUExperts, _GroupedGeGLU
from moe_morpheus.moe.faster.stats import FasterStats

# _GroupedGeGLU's parameter order (GeGLUExperts registers them in this order).
_GEGLU = ("w_value_EFD", "b_value_EF", "w_gate_proj_EFD", "b_gate_proj_EF", "w_out_EDF", "b_out_ED")


class ExpertParams:
    """One expert's parameters of an FMoE's experts, flattened and run from a flat row.

    ``GeGLUExperts``: row e of each batched tensor. ``nn.ModuleList``: expert e's parameters;
    shadowing runs a broadcast expert through local expert 0's module (as FastMoE stashes it
    there), so all experts must be of one class with identical parameter names and shapes.
    """

    def __init__(self, experts: nn.Module):
        if isinstance(experts, GeGLUExperts):
            self.batched = True
            self.params = [getattr(experts, n) for n in _GEGLU]
            self.shapes = [(n, tuple(p.shape[1:])) for n, p in zip(_GEGLU, self.params)]
        elif isinstance(experts, nn.ModuleList):
            self.batched = False
            layouts = [(type(m), [(n, tuple(p.shape)) for n, p in m.named_parameters()]) for m in experts]
            for e, layout in enumerate(layouts):
                if layout != layouts[0]:
                    raise ValueError(
                        f"moe.faster.shadow needs experts of one shape: expert 0 is {layouts[0][0].__name__} "
                        f"{layouts[0][1]}, expert {e} is {layout[0].__name__} {layout[1]} (a shadowed expert "
                        f"is broadcast as one flat parameter row and run through expert 0's module)")
            self.params = [p for m in experts for p in m.parameters()]
            self.shapes = layouts[0][1]
        else:
            raise ValueError(f"moe.faster.shadow supports GeGLUExperts or a ModuleList of experts, not "
                             f"{type(experts).__name__}: it must read and run one expert's parameters")
        self.experts = experts
        self.sizes = [math.prod(shape) for _, shape in self.shapes]
        self.numel = sum(self.sizes)

    def tensors(self, e: int) -> list[torch.Tensor]:
        if self.batched:
            return [p[e] for p in self.params]
        return list(self.experts[e].parameters())

    def flat(self, e: int) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1) for t in self.tensors(e)])

    def unflatten(self, row_P: torch.Tensor) -> list[torch.Tensor]:
        return [part.view(shape) for part, (_, shape) in zip(row_P.split(self.sizes), self.shapes)]

    def grads(self, rows: dict[int, torch.Tensor]) -> list[torch.Tensor | None]:
        """Gradients of :attr:`params` from flat gradient rows of local experts."""
        if not rows:
            return [None] * len(self.params)
        if self.batched:
            out = [torch.zeros_like(p) for p in self.params]
            for e, row_P in rows.items():
                for grad, part in zip(out, self.unflatten(row_P)):
                    grad[e] = part
            return out
        per_expert = len(self.shapes)
        out = [None] * len(self.params)
        for e, row_P in rows.items():
            out[e * per_expert:(e + 1) * per_expert] = self.unflatten(row_P)
        return out

    def run(self, flat_SP: torch.Tensor, x_ND: torch.Tensor, counts_S: list[int]) -> torch.Tensor:
        """Shadowed expert j on its ``counts_S[j]`` consecutive rows of ``x_ND``."""
        if self.batched:
            S = flat_SP.shape[0]
            stacked = [part.reshape(S, *shape) for part, (_, shape) in zip(flat_SP.split(self.sizes, dim=1), self.shapes)]
            return _GroupedGeGLU.apply(x_ND.contiguous(), counts_S, *stacked)
        names = [n for n, _ in self.shapes]
        outs, start = [], 0
        for j, n in enumerate(counts_S):
            if n:
                params = dict(zip(names, self.unflatten(flat_SP[j])))
                outs.append(functional_call(self.experts[0], params, (x_ND[start:start + n],)))
            start += n
        return torch.cat(outs) if outs else x_ND[:0]


class Shadow:
    """Broadcast, local computation and gradient reduction of the shadowed experts."""

    def __init__(self, layout: ExpertParams, group, num_expert: int):
        self.layout = layout
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.num_expert = num_expert

    def __call__(self, shadow: list[int], x_ND: torch.Tensor, counts_S: list[int], stats: FasterStats):
        """Rows of the shadowed experts (``counts_S[j]`` for ``shadow[j]``, in that order) through
        their broadcast copies; differentiable in ``x_ND`` and in the owners' parameters."""
        owners = [g // self.num_expert for g in shadow]
        flat_SP = _Broadcast.apply(self, shadow, owners, stats, *self.layout.params)
        return self.layout.run(flat_SP, x_ND, counts_S)

    def owner_blocks(self, owners: list[int]):
        """(owner, first row, end row) of the [S, P] buffer; shadow ids are sorted, so each
        owner's experts are consecutive."""
        blocks, start = [], 0
        for j in range(1, len(owners) + 1):
            if j == len(owners) or owners[j] != owners[start]:
                blocks.append((owners[start], start, j))
                start = j
        return blocks


class _Broadcast(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shadow_op: Shadow, shadow, owners, stats, *params):
        layout, rank = shadow_op.layout, shadow_op.rank
        flat_SP = params[0].new_empty(len(shadow), layout.numel)
        works = []
        with stats.timed("shadow_comm", flat_SP):
            for owner, start, end in shadow_op.owner_blocks(owners):
                if owner == rank:
                    for j in range(start, end):
                        flat_SP[j] = layout.flat(shadow[j] % shadow_op.num_expert)
                src = dist.get_global_rank(shadow_op.group, owner)
                works.append(dist.broadcast(flat_SP[start:end], src, group=shadow_op.group, async_op=True))
            for work in works:
                work.wait()
        stats.add_bytes("shadow", flat_SP.numel() * flat_SP.element_size())
        ctx.shadow_op, ctx.shadow, ctx.owners, ctx.stats = shadow_op, shadow, owners, stats
        return flat_SP

    @staticmethod
    def backward(ctx, grad_SP):
        shadow_op, rank = ctx.shadow_op, ctx.shadow_op.rank
        grad_SP = grad_SP.contiguous().clone()  # reduce uses its input as scratch on some backends
        works, mine = [], {}
        with ctx.stats.timed("shadow_comm", grad_SP):
            for owner, start, end in shadow_op.owner_blocks(ctx.owners):
                dst = dist.get_global_rank(shadow_op.group, owner)
                works.append(dist.reduce(grad_SP[start:end], dst, op=dist.ReduceOp.SUM, group=shadow_op.group,
                                         async_op=True))
                if owner == rank:
                    mine.update({ctx.shadow[j] % shadow_op.num_expert: grad_SP[j] for j in range(start, end)})
            for work in works:
                work.wait()
        ctx.stats.add_bytes("shadow", grad_SP.numel() * grad_SP.element_size())
        grads = shadow_op.layout.grads(mine)
        return (None, None, None, None, *(g if need else None for g, need in zip(grads, ctx.needs_input_grad[4:])))
