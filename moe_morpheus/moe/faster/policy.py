"""FasterMoE's performance model: which experts to shadow, and what shadowing and the smart
schedule are predicted to save (FasterMoE, PPoPP'22, sec. 4; docs/design.md#fastermoe).

Shape legend: W ranks of the expert-parallel group, E local experts, G = W * E experts.
``load_WG[w, g]`` = assignments rank w sends to global expert g this step (all-gathered, so
every rank holds the same matrix and takes the same decision).

FastMoE's shipped policy (``shadow_policy.global_policy``) sorts ``load.sum(1)``, the tokens each
rank SENDS; with equal batch sizes every entry is the same and it never shadows. The prototype,
and this module, use the load each expert RECEIVES, ``load_WG.sum(0)``. And where FastMoE models
one expert per rank (latency = the hottest expert's), this model sums each rank's experts, so it
also holds for E > 1:

    tokens computed by rank r:  sum over its unshadowed experts of their received load
                                + its own tokens of every shadowed expert (computed locally)
    tokens crossing its link:   max(sent, received) rows of unshadowed experts, other ranks only
    step latency = max_r (3 * compute_r + 4 * transfer_r) + |shadow| * 2 * param_transfer

3 = forward + backward (two matmuls per forward one); 4 = tokens out and results back, in
forward and again (their gradients) in backward; a shadowed expert's parameters are broadcast
in forward and its gradients reduced in backward (2 transfers; FastMoE counts one). The
greedy search is FastMoE's: experts by received load, hottest first; shadow the next one while
the predicted latency drops, stop at the first that does not pay.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Costs:
    """Per-unit costs of one MoE layer: ``token_flops`` = forward FLOPs of one token through one
    expert (2 per multiply-add: 2 * expert parameters), ``token_bytes`` = one token row,
    ``param_bytes`` = one expert's parameters; ``net_bandwidth`` bytes/s, ``flops`` FLOP/s."""

    token_flops: float
    token_bytes: float
    param_bytes: float
    net_bandwidth: float
    flops: float

    @property
    def compute_s(self) -> float:  # one token, one expert, forward
        return self.token_flops / self.flops

    @property
    def transfer_s(self) -> float:  # one token row over the network
        return self.token_bytes / self.net_bandwidth

    @property
    def param_transfer_s(self) -> float:
        return self.param_bytes / self.net_bandwidth


def _rank_terms(load_WG: torch.Tensor, num_expert: int, shadow: set[int]) -> tuple[list[float], list[float]]:
    """(tokens computed, tokens over the link = max(sent, received)) per rank."""
    load = load_WG.tolist()
    W, G = len(load), len(load[0])
    computed, sent, received = [0.0] * W, [0.0] * W, [0.0] * W
    for g in range(G):
        owner = g // num_expert
        for w in range(W):
            n = load[w][g]
            if g in shadow:
                computed[w] += n
            else:
                computed[owner] += n
                if w != owner:
                    sent[w] += n
                    received[owner] += n
    return computed, [max(s, r) for s, r in zip(sent, received)]


def predict_latency(load_WG: torch.Tensor, num_expert: int, shadow, costs: Costs) -> float:
    """Predicted forward + backward seconds of the layer's exchange and experts (no overlap)."""
    computed, link = _rank_terms(load_WG, num_expert, set(shadow))
    worst = max(3 * c * costs.compute_s + 4 * t * costs.transfer_s for c, t in zip(computed, link))
    return worst + len(shadow) * 2 * costs.param_transfer_s


def decide_shadow(load_WG: torch.Tensor, num_expert: int, costs: Costs) -> list[int]:
    """Experts to shadow this step (sorted ids): FastMoE's greedy on the received load."""
    received_G = load_WG.sum(0).tolist()
    candidates = sorted(range(len(received_G)), key=lambda g: (-received_G[g], g))
    shadow: list[int] = []
    best = predict_latency(load_WG, num_expert, shadow, costs)
    for g in candidates:
        if received_G[g] == 0:
            break
        latency = predict_latency(load_WG, num_expert, shadow + [g], costs)
        if latency >= best:
            break
        shadow, best = shadow + [g], latency
    return sorted(shadow)


def step_groups(rank: int, world_size: int, group_size: int) -> list[tuple[range, range]]:
    """Smart schedule steps of ``rank``: (ranks it sends to, ranks it receives from) at step s =
    groups (g + s) mod n and (g - s) mod n of ``group_size`` consecutive ranks, n = W / size."""
    n, g = world_size // group_size, rank // group_size

    def members(group):
        return range(group * group_size, (group + 1) * group_size)

    return [(members((g + s) % n), members((g - s) % n)) for s in range(n)]


def predict_schedule(load_WG: torch.Tensor, num_expert: int, group_size: int, costs: Costs) -> tuple[float, float]:
    """(plain, scheduled) predicted forward + backward seconds, slowest rank, no shadowing.

    Per rank and step s: d_s = rows of step s over the link (max(sent, received), self excluded),
    c_s = rows computed, r_s = results back (the mirror of d_s). Pipelined, C_s overlaps the
    dispatch of step s + 1 and the return of step s - 1 (FasterMoE's Fig. 8):
    d_0 + sum_s max(c_s, d_{s+1} + r_{s-1}) + r_{n-1}; plain = sum_s (d_s + c_s + r_s). Backward
    is the same with twice the compute.
    """
    load = load_WG.tolist()
    W = len(load)
    plain = sched = 0.0
    for rank in range(W):
        mine = range(rank * num_expert, (rank + 1) * num_expert)
        d, c = [], []
        for dests, srcs in step_groups(rank, W, group_size):
            out = sum(load[rank][g] for dst in dests if dst != rank
                      for g in range(dst * num_expert, (dst + 1) * num_expert))
            into = sum(load[src][g] for src in srcs if src != rank for g in mine)
            d.append(max(out, into) * costs.transfer_s)
            c.append(sum(load[src][g] for src in srcs for g in mine) * costs.compute_s)
        r = d  # results go back over the same pairs, same row counts
        rank_plain = rank_sched = 0.0
        for factor in (1, 2):  # forward, backward
            n = len(c)
            rank_plain += sum(d) + factor * sum(c) + sum(r)
            rank_sched += d[0] + r[-1] + sum(
                max(factor * c[s], (d[s + 1] if s + 1 < n else 0.0) + (r[s - 1] if s else 0.0)) for s in range(n))
        plain, sched = max(plain, rank_plain), max(sched, rank_sched)
    return plain, sched


def calibrate(group, run_expert, d_model: int, token_flops: float, *, net_bandwidth: float | None,
              flops: float | None, device: torch.device, reps: int = 3) -> tuple[float, float]:
    """(net bandwidth bytes/s, expert FLOP/s) for the policy, measured on the actual backend
    unless given: the best of ``reps`` broadcasts of 4 MiB over ``group`` (the transfer a
    shadowed expert costs) and the best of ``reps`` forwards of 256 tokens through
    ``run_expert`` (one local expert). Each rank keeps its slowest peer's numbers (one MAX
    all-reduce of the times), so the policy's inputs, and decisions, are identical on every
    rank. Costs ~10 ms on 2 CPU processes.
    """
    times = torch.zeros(2, dtype=torch.float64, device=device)
    buf = torch.zeros(1 << 20, device=device)  # 4 MiB of fp32
    sync = torch.cuda.synchronize if buf.is_cuda else (lambda: None)
    if net_bandwidth is None:
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast(buf, src, group=group)  # warm-up: first use of a pair sets up connections
        times[0] = _best_time(lambda: dist.broadcast(buf, src, group=group), reps, sync)
    if flops is None:
        x_ND = torch.randn(256, d_model, device=device)
        with torch.no_grad():
            run_expert(x_ND)
            times[1] = _best_time(lambda: run_expert(x_ND), reps, sync)
    dist.all_reduce(times, op=dist.ReduceOp.MAX, group=group)
    bw = net_bandwidth if net_bandwidth is not None else buf.numel() * buf.element_size() / times[0].item()
    fl = flops if flops is not None else 256 * token_flops / times[1].item()
    return bw, fl


def _best_time(fn, reps: int, sync) -> float:
    best = float("inf")
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)
