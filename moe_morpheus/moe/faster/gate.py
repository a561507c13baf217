"""FasterMoE's topology-aware gate (congestion-avoiding expert selection; FasterMoE, PPoPP'22,
sec. 6; FastMoE's ``FasterGate``; docs/design.md#fastermoe).

Shape legend: T tokens, D model dim, G experts in total, K top-k.

Links between nodes are the slowest in a two-level tree, so only a fraction of a rank's tokens
may go to an expert on another node. Per batch: if at least q = int(T * outgoing_fraction)
tokens have their top-1 expert off-node, every token's K experts are chosen among the on-node
experts, then the q off-node-top-1 tokens with the highest top-1 logit get that top-1 back in
their last slot; otherwise routing is plain top-k. Scores: softmax over the K chosen logits
(probabilities with ``softmax_before_topk``). FastMoE's version is top-2 only; here the last
slot of any K is the one handed back. The balance loss counts the final assignments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moe_morpheus.moe.gates import NaiveGate


class TopologyGate(NaiveGate):
    """``gate: faster``. Expert g lives on rank g // E of the expert-parallel group, and that
    rank's node is its global rank // ``ranks_per_node`` (ranks are numbered node by node, as
    torchrun does). ``rank``: this process's global rank (default: from torch.distributed)."""

    def __init__(self, d_model, num_expert, world_size, top_k=2, *, ranks_per_node: int = 8,
                 outgoing_fraction: float = 0.14, moe_group=None, rank: int | None = None, **options):
        super().__init__(d_model, num_expert, world_size, top_k, **options)
        if ranks_per_node < 1 or not 0.0 <= outgoing_fraction <= 1.0:
            raise ValueError(f"TopologyGate needs ranks_per_node >= 1 and outgoing_fraction in [0, 1]; got "
                             f"{ranks_per_node}, {outgoing_fraction}")
        if moe_group is not None:
            global_ranks = [dist.get_global_rank(moe_group, r) for r in range(world_size)]
        else:  # FMoE's default group is the world: group rank == global rank
            global_ranks = list(range(world_size))
        if rank is None:
            rank = dist.get_rank() if dist.is_initialized() else 0
        node = rank // ranks_per_node
        off_node_G = torch.tensor([global_ranks[g // num_expert] // ranks_per_node != node
                                   for g in range(self.tot_expert)])
        on_node = int((~off_node_G).sum())
        if on_node < top_k:
            raise ValueError(f"gate=faster: only {on_node} experts are on this node ({ranks_per_node} ranks per "
                             f"node x {num_expert} experts), fewer than top_k={top_k}")
        self.register_buffer("off_node_G", off_node_G, persistent=False)
        self.outgoing_fraction = outgoing_fraction

    def forward(self, x_TD: torch.Tensor):
        logits_TG = self.gate(x_TD).float()
        probs_TG = logits_TG.softmax(dim=-1)
        idx_TK = self.select(logits_TG.detach())
        scores_TK = probs_TG if self.softmax_before_topk else logits_TG
        score_TK = scores_TK.gather(1, idx_TK)
        if not self.softmax_before_topk:
            score_TK = score_TK.softmax(dim=-1)
        self._record_losses(logits_TG, probs_TG, idx_TK)
        return self.apply_capacity(idx_TK, score_TK), score_TK.to(x_TD.dtype)

    def select(self, logits_TG: torch.Tensor) -> torch.Tensor:
        """Expert ids [T, K] under the outgoing quota."""
        T, K = logits_TG.shape[0], self.top_k
        top1_val_T, top1_T = logits_TG.max(dim=-1)
        off_T = self.off_node_G[top1_T]
        quota = int(T * self.outgoing_fraction)
        if int(off_T.sum()) < quota:
            return logits_TG.topk(K, dim=-1).indices
        idx_TK = logits_TG.masked_fill(self.off_node_G, float("-inf")).topk(K, dim=-1).indices
        keep = top1_val_T.masked_fill(~off_T, float("-inf")).topk(quota).indices
        idx_TK[keep, K - 1] = top1_T[keep]
        return idx_TK
