"""FasterMoE attached to an :class:`~moe_morpheus.moe.layer.FMoE`: the layer calls
:meth:`FasterMoE.plan_shadow` after counting its routed rows, :meth:`FasterMoE.run_shadow` on the
rows of the shadowed experts and :meth:`FasterMoE.exchange` instead of its all-to-all.

Shape legend: G experts in total, E local experts, W ranks, N rows, D model dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_morpheus.moe.faster.policy import Costs, calibrate, decide_shadow, predict_latency
from moe_morpheus.moe.faster.schedule import SmartSchedule
from moe_morpheus.moe.faster.shadow import ExpertParams, Shadow
from moe_morpheus.moe.faster.stats import FasterStats


class FasterMoE:
    """Smart schedule and/or dynamic shadowing for one FMoE layer (``layer.faster = ...``).

    ``group_size`` must divide ``layer.world_size``. ``net_bandwidth`` (bytes/s) and ``flops``
    (expert FLOP/s) feed the shadowing policy; None = measured on the first forward
    (:func:`~moe_morpheus.moe.faster.policy.calibrate`). ``policy``: ``load_WG -> expert ids``
    replacing the performance model (FastMoE lets callers pass ``stored_models`` the same way).
    """

    def __init__(self, layer, *, schedule: bool = False, group_size: int = 1, shadow: bool = False,
                 net_bandwidth: float | None = None, flops: float | None = None, policy=None):
        if layer.experts is None:
            raise ValueError("FasterMoE needs the layer's experts (FMoE built with expert=None has none yet)")
        W, E = layer.world_size, layer.num_expert
        self.num_expert, self.world_size, self.group = E, W, layer.moe_group
        self.stats = FasterStats(layer.tot_expert)
        self.schedule = SmartSchedule(layer.moe_group, W, group_size) if schedule and W > 1 else None
        if schedule and W == 1 and group_size != 1:
            raise ValueError(f"moe.faster.group_size={group_size} does not divide the expert-parallel size 1")
        # The shape check runs at any W: a config that cannot shadow fails on one process too.
        layout = ExpertParams(layer.experts) if shadow else None
        self.shadow = Shadow(layout, layer.moe_group, E) if shadow and W > 1 else None
        self.policy = policy
        self.costs: Costs | None = None
        self._measure = (net_bandwidth, flops)
        if layout is not None:
            self._token_flops = 2.0 * layout.numel  # one multiply-add per weight per token
            self._param_bytes = layout.numel * layout.params[0].element_size()
        self.layer = layer

    # ---- shadowing -------------------------------------------------------------------------
    def plan_shadow(self, kept_G: torch.Tensor) -> list[int]:
        """Sorted global ids of the experts to shadow this forward (identical on every rank:
        computed from the all-gathered counts)."""
        if self.shadow is None:
            self.stats.record_forward([], None)
            return []
        parts = [torch.empty_like(kept_G) for _ in range(self.world_size)]
        dist.all_gather(parts, kept_G.contiguous(), group=self.group)
        load_WG = torch.stack(parts).cpu()
        costs = self._costs(kept_G)
        shadow = sorted(self.policy(load_WG)) if self.policy is not None else decide_shadow(load_WG, self.num_expert, costs)
        predicted = (predict_latency(load_WG, self.num_expert, [], costs),
                     predict_latency(load_WG, self.num_expert, shadow, costs))
        self.stats.record_forward(shadow, predicted)
        return shadow

    def _costs(self, like: torch.Tensor) -> Costs:
        if self.costs is None:
            layer = self.layer
            bw, fl = calibrate(self.group, lambda x: layer._run_experts(x, [x.shape[0]] + [0] * (self.num_expert - 1)),
                               layer.d_model, self._token_flops, net_bandwidth=self._measure[0],
                               flops=self._measure[1], device=like.device)
            self.costs = Costs(self._token_flops, layer.d_model * self.shadow.layout.params[0].element_size(),
                               self._param_bytes, bw, fl)
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
