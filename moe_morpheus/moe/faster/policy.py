"""FasterMoE's performance model: which experts to shadow, whether the smart schedule pays, and
what each is predicted to save (FasterMoE, PPoPP'22, sec. 4-5; docs/design.md#fastermoe).

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
    step latency = max_r (3 * compute_r + 4 * transfer_r)
                   + shadowing: 3 calls of the shadowed experts, 2 transfers per owner's block

3 = forward + backward (two matmuls per forward one); 4 = tokens out and results back, in
forward and again (their gradients) in backward; a shadowed expert's parameters are broadcast
in forward and its gradients reduced in backward (2 transfers; FastMoE counts one).

The paper's model has bandwidths only. On the machine it runs on, fixed costs decide small
layers: a gloo all-to-all or broadcast costs ~0.1-1 ms before its first byte, an expert call
has its own overhead, and on a CPU a transfer hides behind computation only partly (both
compete for the same cores). :class:`Costs` carries those terms, measured by
:func:`~moe_morpheus.moe.faster.calibrate.calibrate`; with them zero it is the paper's model.
The greedy search is FastMoE's (experts by received load, hottest first; shadow the next one
while the predicted latency drops), and a choice is taken only when it is predicted to save at
least ``MARGIN`` of the plain layer's time: the rest is within the model's error, where acting
costs more than it can gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Act only on a predicted saving of at least 10% of the modelled time (the exchange and the
# experts, ~80% of the layer's). On benchmarks/fastermoe.py (2 gloo CPU processes) the calibrated
# model over-predicts shadowing's speed-up of the whole layer by 0.07 (skewed load: 1.17x
# predicted, 1.10x measured) to 0.09 (uniform: 0.96x vs 0.87x); a 5% margin would let a
# predicted gain measure as a loss.
MARGIN = 0.10


@dataclass(frozen=True)
class Costs:
    """Per-unit costs of one MoE layer: ``token_flops`` = forward FLOPs of one token through one
    expert (2 per multiply-add: 2 * expert parameters), ``token_bytes`` = one token row,
    ``param_bytes`` = one expert's parameters; ``net_bandwidth`` bytes/s of the token exchange,
    ``flops`` expert FLOP/s.

    Fixed costs (0 = FasterMoE's bandwidth-only model): ``exchange_latency_s`` per peer of one
    exchange (an all-to-all pays it for W - 1 peers, a smart-schedule step for the peers of its
    group), ``call_latency_s`` of one expert call
    beyond its tokens, ``param_latency_s`` of one broadcast or reduce of parameters, which move
    at ``param_bandwidth`` bytes/s (0: ``net_bandwidth``); ``overlap`` = the fraction of
    min(computation, transfer) that a pipelined step hides (1: all of it, the paper's Fig. 8).
    """

    token_flops: float
    token_bytes: float
    param_bytes: float
    net_bandwidth: float
    flops: float
    exchange_latency_s: float = 0.0
    call_latency_s: float = 0.0
    param_latency_s: float = 0.0
    param_bandwidth: float = 0.0
    overlap: float = 1.0

    @property
    def compute_s(self) -> float:  # one token, one expert, forward
        return self.token_flops / self.flops

    @property
    def transfer_s(self) -> float:  # one token row over the network
        return self.token_bytes / self.net_bandwidth

    @property
    def param_transfer_s(self) -> float:
        return self.param_bytes / (self.param_bandwidth or self.net_bandwidth)

    def exchange(self, rows: float, peers: int) -> float:
        """One exchange of ``rows`` token rows with ``peers`` other ranks (a collective pays its
        latency even when it moves nothing)."""
        return peers * self.exchange_latency_s + rows * self.transfer_s

    def call(self, rows: float) -> float:
        """One forward expert call on ``rows`` rows."""
        return self.call_latency_s + rows * self.compute_s

    def overlapped(self, a: float, b: float) -> float:
        """Two things run side by side: max(a, b) when they overlap fully, a + b when not."""
        return a + b - self.overlap * min(a, b)


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
    peers = len(computed) - 1
    worst = max(3 * costs.call(c) + 4 * costs.exchange(t, peers) for c, t in zip(computed, link))
    if not shadow:
        return worst
    owners = len({g // num_expert for g in shadow})
    # Shadowed experts run in their own call on every rank (forward, and twice in backward);
    # each owner broadcasts its block and receives its reduced gradients.
    return (worst + 3 * costs.call_latency_s + 2 * owners * costs.param_latency_s
            + 2 * len(shadow) * costs.param_transfer_s)


def decide_shadow(load_WG: torch.Tensor, num_expert: int, costs: Costs) -> list[int]:
    """Experts to shadow this step (sorted ids): FastMoE's greedy on the received load, kept
    only if it saves at least ``MARGIN`` of the plain latency."""
    received_G = load_WG.sum(0).tolist()
    candidates = sorted(range(len(received_G)), key=lambda g: (-received_G[g], g))
    shadow: list[int] = []
    plain = best = predict_latency(load_WG, num_expert, shadow, costs)
    for g in candidates:
        if received_G[g] == 0:
            break
        latency = predict_latency(load_WG, num_expert, shadow + [g], costs)
        if latency >= best:
            break
        shadow, best = shadow + [g], latency
    return sorted(shadow) if best <= (1 - MARGIN) * plain else []


def step_groups(rank: int, world_size: int, group_size: int) -> list[tuple[range, range]]:
    """Smart schedule steps of ``rank``: (ranks it sends to, ranks it receives from) at step s =
    groups (g + s) mod n and (g - s) mod n of ``group_size`` consecutive ranks, n = W / size."""
    n, g = world_size // group_size, rank // group_size

    def members(group):
        return range(group * group_size, (group + 1) * group_size)

    return [(members((g + s) % n), members((g - s) % n)) for s in range(n)]


def predict_schedule(load_WG: torch.Tensor, num_expert: int, group_size: int, costs: Costs) -> tuple[float, float]:
    """(plain, scheduled) predicted forward + backward seconds, slowest rank, no shadowing.

    Per rank and step s: d_s = the transfer of step s's rows over the link (max(sent, received),
    self excluded; nothing when there are none), c_s = the expert call on the rows computed,
    r_s = results back (the mirror of d_s). Pipelined, C_s runs beside the dispatch of step
    s + 1 and the return of step s - 1 (FasterMoE's Fig. 8, hidden by ``costs.overlap``):
    d_0 + sum_s overlapped(c_s, d_{s+1} + r_{s-1}) + r_{n-1}, each d_s paying the latency of its
    step's peers. Plain is one all-to-all each way (W - 1 peers) and one call:
    2 * exchange(max(sent, received)) + call(computed). Backward is the same with
    twice the compute.
    """
    load = load_WG.tolist()
    W = len(load)
    plain = sched = 0.0
    for rank in range(W):
        mine = range(rank * num_expert, (rank + 1) * num_expert)
        d, c, rows_link, rows_computed = [], [], [0, 0], 0
        for dests, srcs in step_groups(rank, W, group_size):
            out = sum(load[rank][g] for dst in dests if dst != rank
                      for g in range(dst * num_expert, (dst + 1) * num_expert))
            into = sum(load[src][g] for src in srcs if src != rank for g in mine)
            computed = sum(load[src][g] for src in srcs for g in mine)
            peers = max(len([w for w in dests if w != rank]), len([w for w in srcs if w != rank]))
            d.append(costs.exchange(max(out, into), peers) if out or into else 0.0)
            c.append(costs.call(computed) if computed else 0.0)
            rows_link[0], rows_link[1] = rows_link[0] + out, rows_link[1] + into
            rows_computed += computed
        r = d  # results go back over the same pairs, same row counts
        n = len(c)
        rank_plain = rank_sched = 0.0
        for factor in (1, 2):  # forward, backward
            rank_plain += 2 * costs.exchange(max(rows_link), W - 1) + factor * costs.call(rows_computed)
            rank_sched += d[0] + r[-1] + sum(
                costs.overlapped(factor * c[s], (d[s + 1] if s + 1 < n else 0.0) + (r[s - 1] if s else 0.0))
                for s in range(n))
        plain, sched = max(plain, rank_plain), max(sched, rank_sched)
    return plain, sched


def decide_schedule(predicted: tuple[float, float]) -> bool:
    """Whether this step's exchange runs the smart schedule, from :func:`predict_schedule`'s
    (plain, scheduled): only where it is predicted to save at least ``MARGIN`` of the plain time."""
    plain, sched = predicted
    return sched < (1 - MARGIN) * plain
