"""FasterMoE's smart schedule: the token exchange split into group-wise steps, each step's
transfer overlapped with the previous step's expert computation, in forward and backward
(FasterMoE, PPoPP'22, sec. 5; docs/design.md#fastermoe).

Shape legend: N rows this rank sends (sorted by destination rank, then local expert), R rows it
receives (by source rank, then local expert: the plain all-to-all's layout), D model dim,
E local experts, W ranks, n = W / group_size steps.

Step s of rank r in group g: S_s sends to the ranks of group (g + s) mod n and receives from
group (g - s) mod n; C_s runs the local experts on the rows from group (g - s) mod n; R_s sends
those results back (the mirrored pattern). The loop posts S_{s+1} before C_s and R_s right
after it, so C_s overlaps S_{s+1} and R_{s-1}. Transfers are asynchronous point-to-point
operations (``batch_isend_irecv``: grouped on NCCL; on gloo each op is posted on its own,
matched by (peer, tag), so every step and direction has its own tag). Step 0 is the rank's own
group, itself included: its own rows are copied, never sent.

Autograd (as FastMoE): each step's expert computation is its own small graph on a detached
chunk (``x.detach().requires_grad_()``); backward replays the same pipeline with gradients,
calling ``torch.autograd.grad`` per chunk, and returns the expert parameters' gradients as the
Function's outputs (no side effects on ``.grad``, so Megatron-Core's DDP hooks see them once).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_morpheus.moe.faster.policy import step_groups
from moe_morpheus.moe.faster.stats import FasterStats

# Tags of the four transfer kinds; step s uses base + s. Distinct per kind so that gloo never
# matches, say, step 1's tokens with step 0's results between the same pair of ranks.
_TAG_STRIDE = 1 << 12
_DISPATCH, _RETURN = 0, 1


def _offsets(counts: list[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


class SmartSchedule:
    """Group-wise pipelined exchange + expert computation for one expert-parallel group."""

    def __init__(self, group, world_size: int, group_size: int):
        if group_size < 1 or world_size % group_size:
            raise ValueError(f"moe.faster.group_size={group_size} does not divide the expert-parallel size "
                             f"{world_size}: the smart schedule exchanges with whole groups of ranks "
                             f"(choose a divisor of {world_size})")
        self.group = group if group is not None else dist.group.WORLD
        self.rank = dist.get_rank(self.group)
        self.global_ranks = [dist.get_global_rank(self.group, r) for r in range(world_size)]
        self.steps = step_groups(self.rank, world_size, group_size)

    def __call__(self, x_send_ND, send_WE, recv_WE, run_experts, params, stats: FasterStats):
        """Rows ``x_send_ND`` (``send_WE[w, e]`` of them for rank w's expert e, in that order)
        through the experts of their ranks; returns the results in the same row order."""
        plan = _Plan(self, send_WE.tolist(), recv_WE.tolist(), run_experts, stats, x_send_ND.device)
        params = [p for p in params if p.requires_grad]
        if torch.is_grad_enabled() and (x_send_ND.requires_grad or params):
            return _Pipelined.apply(plan, x_send_ND, *params)
        return plan.forward(x_send_ND, build_graph=False)

    def post(self, sends, recvs, kind: int, step: int, stats: FasterStats):
        """Post (tensor, group rank) sends and receives; empty ones are skipped on both sides
        (both know the counts), so gloo never sees a zero-byte message."""
        tag = kind * _TAG_STRIDE + step
        ops = [dist.P2POp(dist.isend, t, self.global_ranks[p], self.group, tag) for t, p in sends if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.global_ranks[p], self.group, tag) for t, p in recvs if t.numel()]
        stats.add_bytes("exchange", sum(t.numel() * t.element_size() for t, _ in sends))
        return dist.batch_isend_irecv(ops) if ops else []


class _Plan:
    """Row offsets and per-step chunk layouts of one call."""

    def __init__(self, sched: SmartSchedule, send_WE: list[list[int]], recv_WE: list[list[int]],
                 run_experts, stats: FasterStats, device: torch.device):
        self.sched, self.run_experts, self.stats = sched, run_experts, stats
        self.send_off = _offsets([sum(row) for row in send_WE])
        self.recv_off = _offsets([sum(row) for row in recv_WE])
        E = len(recv_WE[0])
        self.chunks = []  # per step: (first row, end row, perm to expert-major, inverse, counts_E)
        for _, srcs in sched.steps:
            block_counts = [recv_WE[w][e] for w in srcs for e in range(E)]  # (source, expert) blocks
            block_R = torch.repeat_interleave(torch.arange(len(block_counts)), torch.tensor(block_counts))
            perm = torch.argsort((block_R % E) * len(srcs) + block_R // E, stable=True)
            inverse = torch.empty_like(perm)
            inverse[perm] = torch.arange(perm.numel())
            counts_E = [sum(recv_WE[w][e] for w in srcs) for e in range(E)]
            self.chunks.append((self.recv_off[srcs.start], self.recv_off[srcs.stop], perm.to(device),
                                inverse.to(device), counts_E))

    def rows_send(self, t, w):
        return t[self.send_off[w]:self.send_off[w + 1]]

    def rows_recv(self, t, w):
        return t[self.recv_off[w]:self.recv_off[w + 1]]

    def _pipeline(self, src_ND, out_rows: int, compute):
        """The S/C/R loop shared by forward and backward: ``src_ND`` (send layout) goes out, each
        received chunk (expert-major) goes through ``compute(step, chunk) -> rows``, and the
        results come back into a new tensor in the send layout."""
        sched, stats = self.sched, self.stats
        recv_RD = src_ND.new_empty(self.recv_off[-1], src_ND.shape[1])
        back_ND = src_ND.new_empty(out_rows, src_ND.shape[1])
        me = sched.rank

        def dispatch(s):
            dests, srcs = sched.steps[s]
            if me in dests:  # step 0: own rows never cross the network
                self.rows_recv(recv_RD, me).copy_(self.rows_send(src_ND, me))
            return sched.post([(self.rows_send(src_ND, w), w) for w in dests if w != me],
                              [(self.rows_recv(recv_RD, w), w) for w in srcs if w != me], _DISPATCH, s, stats)

        pending = dispatch(0)
        returns = []
        for s, (dests, srcs) in enumerate(sched.steps):
            nxt = dispatch(s + 1) if s + 1 < len(sched.steps) else []
            with stats.timed("exchange", src_ND):
                for work in pending:
                    work.wait()
            start, end, perm, inverse, counts_E = self.chunks[s]
            with stats.timed("compute", src_ND):
                out_CD = compute(s, recv_RD[start:end].index_select(0, perm), counts_E).index_select(0, inverse)
            offset = self.recv_off[srcs.start]

            def rows_out(w, out_CD=out_CD, offset=offset):
                return out_CD[self.recv_off[w] - offset:self.recv_off[w + 1] - offset]

            if me in srcs:
                self.rows_send(back_ND, me).copy_(rows_out(me))
            returns += sched.post([(rows_out(w), w) for w in srcs if w != me],
                                  [(self.rows_send(back_ND, w), w) for w in dests if w != me], _RETURN, s, stats)
            pending = nxt
        with stats.timed("exchange", src_ND):
            for work in returns:
                work.wait()
        return back_ND

    def forward(self, x_send_ND, build_graph: bool):
        """Forward pipeline; with ``build_graph`` each chunk keeps (input leaf, output) for
        :meth:`backward`."""
        self.graphs = []

        def compute(s, x_CD, counts_E):
            if x_CD.shape[0] == 0:
                self.graphs.append(None)
                return x_CD
            if not build_graph:
                return self.run_experts(x_CD, counts_E)
            with torch.enable_grad():
                leaf = x_CD.detach().requires_grad_(self.x_needs_grad)
                y_CD = self.run_experts(leaf, counts_E)
            self.graphs.append((leaf, y_CD))
            return y_CD.detach()

        return self._pipeline(x_send_ND.contiguous(), self.send_off[-1], compute)

    def backward(self, grad_ND, params):
        """Gradients of the send buffer and of ``params``, through the same pipeline."""
        param_grads = [None] * len(params)

        def compute(s, grad_CD, counts_E):
            graph = self.graphs[s]
            if graph is None:
                return grad_CD
            leaf, y_CD = graph
            inputs = ([leaf] if self.x_needs_grad else []) + list(params)
            grads = torch.autograd.grad(y_CD, inputs, grad_CD, allow_unused=True)
            self.graphs[s] = None  # free the chunk's graph as soon as it is used
            if self.x_needs_grad:
                grad_x, grads = grads[0], grads[1:]
            else:
                grad_x = torch.zeros_like(grad_CD)
            for i, g in enumerate(grads):
                if g is not None:
                    param_grads[i] = g if param_grads[i] is None else param_grads[i] + g
            return grad_x

        grad_x = self._pipeline(grad_ND.contiguous(), self.send_off[-1], compute)
        return grad_x, param_grads


class _Pipelined(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: _Plan, x_send_ND, *params):
        plan.x_needs_grad = x_send_ND.requires_grad
        ctx.plan, ctx.params = plan, params
        return plan.forward(x_send_ND, build_graph=True)

    @staticmethod
    def backward(ctx, grad_ND):
        grad_x, param_grads = ctx.plan.backward(grad_ND, ctx.params)
        ctx.plan = None
        return (None, grad_x if ctx.needs_input_grad[1] else None, *param_grads)
