"""FasterMoE attached to an :class:`~moe_morpheus.moe.layer.FMoE`: the layer calls
:meth:`FasterMoE.plan` after counting its routed rows, :meth:`FasterMoE.run_shadow` on the
rows of the shadowed experts and, where the plan chose the smart schedule
(:attr:`FasterMoE.scheduled`), :meth:`FasterMoE.exchange` instead of its all-to-all.

Shape legend: G experts in total, E local experts, W ranks, N rows, D model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_morpheus.moe.faster.calibrate import calibrate
from moe_morpheus.moe.faster.policy import (
    Costs,
    decide_schedule,
    decide_shadow,
    predict_latency,
    predict_schedule,
)
from moe_morpheus.moe.faster.schedule import SmartSchedule
from moe_morpheus.moe.faster.shadow import ExpertParams, Shadow
from moe_morpheus.moe.faster.stats import FasterStats


class FasterMoE:
    """Smart schedule and/or dynamic shadowing for one FMoE layer (``layer.faster = ...``).

    Both are decided per forward, from the all-gathered load, by the performance model with
    costs calibrated on the first forward (:mod:`~moe_morpheus.moe.faster.calibrate`):
    ``schedule=True`` allows the smart schedule and ``shadow=True`` shadowing, each taken only
    where it is predicted to save at least ``policy.MARGIN`` (10%). ``group_size`` must divide
    ``layer.world_size``. ``net_bandwidth`` (bytes/s) and ``flops`` (expert FLOP/s) replace
    their measurements. ``policy``: ``load_WG -> expert ids`` and ``schedule_policy``:
    ``load_WG -> bool`` (the load with the shadowed experts' columns zeroed: what crosses the
    network) replace the model's decisions (FastMoE lets callers pass
    ``stored_models`` the same way; tests force a path with them).
    """

    def __init__(self, layer, *, schedule: bool = False, group_size: int = 1, shadow: bool = False,
                 net_bandwidth: float | None = None, flops: float | None = None, policy=None,
                 schedule_policy=None):
        if layer.experts is None:
            raise ValueError("FasterMoE needs the layer's experts (FMoE built with expert=None has none yet)")
        W, E = layer.world_size, layer.num_expert
        self.num_expert, self.world_size, self.group, self.group_size = E, W, layer.moe_group, group_size
        self.stats = FasterStats(layer.tot_expert)
        self.schedule = SmartSchedule(layer.moe_group, W, group_size) if schedule and W > 1 else None
        if schedule and W == 1 and group_size != 1:
            raise ValueError(f"moe.faster.group_size={group_size} does not divide the expert-parallel size 1")
        # The shape check runs at any W: a config that cannot shadow fails on one process too.
        layout = ExpertParams(layer.experts) if shadow else None
        self.shadow = Shadow(layout, layer.moe_group, E) if shadow and W > 1 else None
        self.policy, self.schedule_policy = policy, schedule_policy
        self.costs: Costs | None = None
        self.scheduled = False  # this forward's exchange runs the smart schedule
        self.load_WG: torch.Tensor | None = None  # this forward's all-gathered counts (plan)
        self._measure = (net_bandwidth, flops)
        params = list(layer.experts.parameters())
        self._param_numel = sum(p.numel() for p in params) // E  # one expert's
        self._dtype = params[0].dtype
        self.layer = layer

    # ---- the plan of one forward ---------------------------------------------------------------
    def plan(self, kept_G: torch.Tensor) -> list[int]:
        """This forward's decisions, identical on every rank (computed from the all-gathered
        counts and the MAX-reduced costs): returns the sorted global ids of the experts to
        shadow and sets :attr:`scheduled`."""
        self.scheduled, self.load_WG = False, None
        if self.shadow is None and self.schedule is None:
            self.stats.record_forward([], None)
            return []
        parts = [torch.empty_like(kept_G) for _ in range(self.world_size)]
        dist.all_gather(parts, kept_G.contiguous(), group=self.group)
        self.load_WG = torch.stack(parts)
        load_WG = self.load_WG.cpu()
        costs = self._costs(kept_G)
        shadow, predicted, predicted_schedule = [], None, None
        if self.shadow is not None:
            shadow = sorted(self.policy(load_WG)) if self.policy is not None else \
                decide_shadow(load_WG, self.num_expert, costs)
            predicted = (predict_latency(load_WG, self.num_expert, [], costs),
                         predict_latency(load_WG, self.num_expert, shadow, costs))
        if self.schedule is not None:
            exchanged_WG = load_WG.clone()
            exchanged_WG[:, shadow] = 0  # shadowed experts' rows never cross the network
            predicted_schedule = predict_schedule(exchanged_WG, self.num_expert, self.group_size, costs)
            self.scheduled = bool(self.schedule_policy(exchanged_WG)) if self.schedule_policy is not None else \
                decide_schedule(predicted_schedule)
        self.stats.record_forward(shadow, predicted, self.scheduled if self.schedule is not None else None,
                                  predicted_schedule)
        return shadow

    def received(self, shadow: list[int]) -> torch.Tensor:
        """``recv[j, e]``: the rows rank j sends to this rank's local expert e outside the
        shadowed experts, what ``comm.exchange_counts`` would return, read from the counts that
        :meth:`plan` all-gathered: the layer skips its count all-to-all, so planning adds no
        collective to a forward (one costs 0.1-0.4 ms on 2 gloo processes, 1% of the layer)."""
        W, E = self.world_size, self.num_expert
        load_WG = self.load_WG.clone()
        load_WG[:, shadow] = 0
        return load_WG.view(W, W, E)[:, dist.get_rank(self.group)]

    def _costs(self, like: torch.Tensor) -> Costs:
        if self.costs is None:
            layer = self.layer
            E = self.num_expert

            def run_expert(x_ND):  # the rows spread over all local experts, as the layer calls them
                counts = [x_ND.shape[0] // E + (e < x_ND.shape[0] % E) for e in range(E)]
                return layer._run_experts(x_ND, counts)

            self.costs = calibrate(self.group, run_expert, layer.d_model, self._param_numel,
                                   net_bandwidth=self._measure[0], flops=self._measure[1], device=like.device,
                                   dtype=self._dtype)
        return self.costs

    def run_shadow(self, shadow: list[int], x_ND: torch.Tensor, counts_S: list[int]) -> torch.Tensor:
        return self.shadow(shadow, x_ND, counts_S, self.stats)

    # ---- exchange ----------------------------------------------------------------------------
    def exchange(self, x_ND, send_WE, recv_WE):
        """Rows to the experts' ranks and back, pipelined (needs ``schedule``)."""
        layer = self.layer
        return self.schedule(x_ND, send_WE, recv_WE, layer._run_experts, list(layer.experts.parameters()),
                             self.stats)

    def pop_stats(self) -> dict:
        return self.stats.pop()
