"""ZeRO-1 (Rajbhandari et al. 2020, stage 1): AdamW's moments sharded over data parallelism.

Gradients are still all-reduced in full by Megatron-Core's DDP (stage 1 shards only the
optimizer state), so the clip sees the same global norm as :class:`~moe_morpheus.train.optim.
Optimizer`. Each parameter, flattened, is cut into ``n`` contiguous chunks of ``ceil(numel / n)``
elements (the last ones shorter or empty), ``n`` the size of its reduction group: the
data-parallel group for dense parameters, the expert-data-parallel group for expert parameters
(``allreduce = False``: their replicas are exactly the ranks DDP reduces them over). Rank ``r``
of the group runs ``torch.optim.AdamW`` on chunk ``r`` of every parameter, through a view that
shares the parameter's storage (the update lands in the parameter itself, no fp32 master copy
is needed: the project keeps fp32 parameters and runs bf16 through autocast), then one
``all_gather_into_tensor`` per group gives every rank every updated chunk.

AdamW is elementwise, so a chunk's update is the unsharded update of those elements: the result
equals the unsharded optimizer's (tested at dp=2 and with EP=2 experts). AdamW state per rank:
``8 * numel / n`` bytes instead of ``8 * numel`` (m and v in fp32).

Checkpoints: :meth:`ZeroOptimizer.moments_like_params` gives each parameter's whole moments
(the unsharded optimizer's format, so a checkpoint reshards to any layout with or without
ZeRO) and :meth:`ZeroOptimizer.load_moments` keeps this rank's chunks of loaded ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moe_morpheus.train.optim import MOMENTS, Optimizer


@dataclass
class Chunk:
    """This rank's part ``[start, end)`` of one flattened parameter."""

    param: torch.nn.Parameter
    group: object  # the process group the parameter's moments are sharded over
    size: int  # that group's size
    start: int
    end: int
    view: torch.Tensor  # param.view(-1)[start:end], sharing the parameter's storage

    @property
    def padded(self) -> int:
        """Chunk length every rank sends in the all-gather (ceil(numel / size))."""
        return math.ceil(self.param.numel() / self.size)


def _chunk(param: torch.nn.Parameter) -> Chunk:
    if param.dtype != torch.float32:
        raise ValueError(f"ZeRO-1 here updates parameters in place and needs fp32 parameters, got {param.dtype} "
                         f"(the trainer keeps fp32 parameters and uses bf16 autocast)")
    expert = not getattr(param, "allreduce", True)
    group = (parallel_state.get_expert_data_parallel_group() if expert
             else parallel_state.get_data_parallel_group())
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    per_rank = math.ceil(param.numel() / size)
    start, end = min(rank * per_rank, param.numel()), min((rank + 1) * per_rank, param.numel())
    view = param.detach().view(-1)[start:end]
    return Chunk(param, group, size, start, end, view)


class ZeroOptimizer(Optimizer):
    """:class:`~moe_morpheus.train.optim.Optimizer` with sharded AdamW state: this rank updates
    its chunk of every parameter, then the updated chunks are all-gathered."""

    def _updated_tensors(self) -> list[tuple[torch.Tensor, bool]]:
        self.chunks = [_chunk(p) for p in self.params]
        # A parameter smaller than its group leaves some ranks an empty chunk: nothing to update.
        self._owned = [c for c in self.chunks if c.end > c.start]
        # A chunk is decayed as its whole parameter is (one decision per logical parameter).
        return [(c.view, self.decayed[id(c.param)]) for c in self._owned]

    def _apply(self, scale: float) -> None:
        for c in self._owned:
            grad = c.param.main_grad.view(-1)[c.start:c.end]
            c.view.grad = grad.mul_(scale) if scale < 1.0 else grad
        self.adam.step()
        for c in self._owned:
            c.view.grad = None
        self._all_gather()

    @torch.no_grad()
    def _all_gather(self) -> None:
        by_group: dict[int, list[Chunk]] = {}
        for c in self.chunks:
            if c.size > 1:
                by_group.setdefault(id(c.group), []).append(c)
        for chunks in by_group.values():
            group, size = chunks[0].group, chunks[0].size
            send = torch.zeros(sum(c.padded for c in chunks), dtype=torch.float32, device=chunks[0].view.device)
            offset = 0
            for c in chunks:
                send[offset: offset + c.end - c.start] = c.view
                offset += c.padded
            received = torch.empty(size * send.numel(), dtype=send.dtype, device=send.device)
            dist.all_gather_into_tensor(received, send, group=group)
            by_rank = received.view(size, send.numel())
            offset = 0
            for c in chunks:
                whole = by_rank[:, offset: offset + c.padded].reshape(-1)[: c.param.numel()]
                c.param.data.view(-1).copy_(whole)
                offset += c.padded

    # ------------------------------------------------------------------ state
    def state_bytes(self) -> int:
        """Bytes of AdamW state tensors this rank holds (what ZeRO-1 divides by the group size)."""
        return sum(t.numel() * t.element_size() for state in self.adam.state.values()
                   for t in state.values() if torch.is_tensor(t) and t.dim() > 0)

    def state_dict(self) -> dict:
        """This rank's AdamW state (chunks: loads back only into the same layout)."""
        return self.adam.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.adam.load_state_dict(state)

    @torch.no_grad()
    def moments_like_params(self) -> dict[torch.nn.Parameter, dict[str, torch.Tensor]]:
        """Each parameter's whole moments, shaped like the parameter (its TP / EP shard), as the
        unsharded optimizer holds them: the chunks all-gathered over each sharding group. A
        checkpoint written from these is the same as the unsharded optimizer's and reshards to
        any layout, ZeRO or not; it costs the unsharded state's memory for the duration of a save.
        (Megatron-Core 0.16.1's ``dist_checkpointing`` rejects ``flattened_range`` shards, so the
        chunks cannot be saved as they are.)"""
        self._materialize()
        out: dict[torch.nn.Parameter, dict[str, torch.Tensor]] = {}
        for moment in MOMENTS:
            views = {id(c.param): self.adam.state[c.view][moment] for c in self._owned}
            for c in self.chunks:
                out.setdefault(c.param, {})[moment] = torch.zeros_like(c.param)
                if c.end > c.start:
                    out[c.param][moment].view(-1)[c.start:c.end] = views[id(c.param)]
            # Chunks are disjoint and zero elsewhere: a sum over the group assembles each moment.
            for c in self.chunks:
                if c.size > 1:
                    dist.all_reduce(out[c.param][moment], group=c.group)
        return out

    @torch.no_grad()
    def load_moments(self, moments: dict[torch.nn.Parameter, dict[str, torch.Tensor]], step: int) -> None:
        """Inverse of :meth:`moments_like_params`: keep this rank's chunk of each whole moment;
        ``step`` is AdamW's step count."""
        self._materialize()
        for c in self._owned:
            state = self.adam.state[c.view]
            for moment in MOMENTS:
                state[moment].copy_(moments[c.param][moment].reshape(-1)[c.start:c.end])
            state["step"].fill_(step)
