"""Gates: which experts each token goes to, with what weight, and the router's auxiliary losses.

Shape legend: T tokens, D model dim, G experts in total (``num_expert * world_size``), K top-k.

A gate is constructed as ``gate(d_model, num_expert, world_size, top_k, **options)`` (FastMoE's
signature; ``num_expert`` is experts per rank) and called on [T, D]; it returns
``(idx [T, K] long, score [T, K])``. ``idx == -1`` marks an assignment the gate dropped
(capacity, GShard random routing): it contributes zero to the output.

One balance-loss formula for every gate (docs/design.md#losses), not FastMoE's per-gate ones
(GShard: local E and top-1 counts; Switch: kept tokens only):

    balance = G * sum_i f_i * P_i,

f_i = fraction of the T * K top-k assignments that chose expert i, counted before any drop;
P_i = mean over tokens of the router probability softmax(logits)_i. At uniform routing
f_i = P_i = 1 / G, so balance = G * G / G^2 = 1 for any K. Router z-loss (ST-MoE, Zoph et al.
2022, eq. 5): mean_t logsumexp(logits_t)^2. Both are computed on every call (a softmax and a
logsumexp over [T, G]); the layer's coefficients decide whether they reach the loss.

Capacity (docs/design.md#capacity): per sending rank and expert, ceil(capacity_factor * T * K / G)
assignments; beyond it, the lowest-score assignments are dropped (ties: the later (token, slot)
is dropped), so drops are deterministic, unlike FastMoE's first-come atomic grants.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class BaseGate(nn.Module):
    """Routing, capacity and auxiliary losses shared by all gates.

    ``capacity``: None (dropless), a factor, or a (training, evaluation) pair of factors.
    ``softmax_before_topk``: route by the top-k of softmax over all G logits and use those
    probabilities as scores (He et al. 2024); default is top-k of the logits, then softmax over
    the k (FastMoE's NaiveGate).

    ``loss_group``: set by :class:`~moe_morpheus.moe.layer.FMoE` to its slice group. Slice ranks
    route disjoint parts of one token set, so f, P and the z-loss mean are taken over the whole
    set (one all-reduce of the detached counts and sums) and each rank's loss is its share of
    the whole-set loss: the gradients, summed over the slice group, equal the unsliced ones.
    """

    def __init__(self, d_model: int, num_expert: int, world_size: int, top_k: int, *,
                 capacity: float | tuple[float, float] | None = None, softmax_before_topk: bool = False):
        super().__init__()
        self.d_model, self.num_expert, self.world_size, self.top_k = d_model, num_expert, world_size, top_k
        self.tot_expert = num_expert * world_size
        if not 1 <= top_k <= self.tot_expert:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts "
                             f"{self.tot_expert} (num_expert={num_expert} x world_size={world_size})")
        if isinstance(capacity, (int, float)):
            capacity = (float(capacity), float(capacity))
        if capacity is not None and min(capacity) <= 0:
            raise ValueError(f"capacity factors must be positive, got {capacity}")
        self.capacity = capacity
        self.softmax_before_topk = softmax_before_topk
        self.loss_group = None
        self.loss: torch.Tensor | None = None
        self.z_loss: torch.Tensor | None = None
        # Detached whole-set values (identical on all slice ranks) for logging.
        self.loss_value: torch.Tensor | None = None
        self.z_loss_value: torch.Tensor | None = None

    # FastMoE's loss API.
    def set_loss(self, loss: torch.Tensor) -> None:
        self.loss = loss

    def get_loss(self, clear: bool = True) -> torch.Tensor | None:
        """This rank's differentiable balance loss (its share of it under a slice group)."""
        loss = self.loss
        if clear:
            self.loss = None
        return loss

    def get_z_loss(self, clear: bool = True) -> torch.Tensor | None:
        loss = self.z_loss
        if clear:
            self.z_loss = None
        return loss

    @property
    def has_loss(self) -> bool:
        return self.loss is not None

    def capacity_per_expert(self, num_tokens: int) -> int | None:
        """ceil(capacity_factor * T * K / G) for the current mode, None when dropless."""
        if self.capacity is None:
            return None
        factor = self.capacity[0] if self.training else self.capacity[1]
        return math.ceil(factor * num_tokens * self.top_k / self.tot_expert)

    def route(self, logits_TG: torch.Tensor, *, scores_are_probs: bool | None = None):
        """Top-k routing of [T, G] logits: records the losses, returns (idx, score) in fp32."""
        logits_TG = logits_TG.float()  # router softmax in fp32 (Switch Transformer, sec. 2.4)
        probs_TG = logits_TG.softmax(dim=-1)
        if self.softmax_before_topk if scores_are_probs is None else scores_are_probs:
            score_TK, idx_TK = probs_TG.topk(self.top_k, dim=-1)
        else:
            top_TK, idx_TK = logits_TG.topk(self.top_k, dim=-1)
            score_TK = top_TK.softmax(dim=-1)
        self._record_losses(logits_TG, probs_TG, idx_TK)
        return idx_TK, score_TK

    def _record_losses(self, logits_TG, probs_TG, idx_TK) -> None:
        T, K = idx_TK.shape
        G = self.tot_expert
        counts_G = torch.bincount(idx_TK.reshape(-1), minlength=G)
        prob_sum_G = probs_TG.sum(0)
        z_sum = torch.logsumexp(logits_TG, dim=-1).square().sum()
        packed = torch.cat([counts_G.double(), prob_sum_G.detach().double(),
                            z_sum.detach().double().reshape(1), torch.tensor([float(T)], dtype=torch.float64)])
        if self.loss_group is not None and dist.get_world_size(self.loss_group) > 1:
            dist.all_reduce(packed, group=self.loss_group)
        counts_all_G, prob_all_G = packed[:G], packed[G:2 * G]
        z_all, tokens_all = packed[2 * G], max(packed[2 * G + 1].item(), 1.0)
        f_G = counts_all_G / (tokens_all * K)
        # d(balance)/d(local probs) only needs f (fixed, no gradient through the argmax) and
        # the local probability sums over the whole set's token count.
        self.loss = G * (f_G.to(prob_sum_G.dtype) * prob_sum_G).sum() / tokens_all
        self.z_loss = z_sum / tokens_all
        self.loss_value = (G * (f_G * prob_all_G).sum() / tokens_all).float()
        self.z_loss_value = (z_all / tokens_all).float()

    def apply_capacity(self, idx_TK: torch.Tensor, score_TK: torch.Tensor) -> torch.Tensor:
        """Drop the lowest-score assignments beyond each expert's capacity (idx := -1)."""
        cap = self.capacity_per_expert(idx_TK.shape[0])
        if cap is None:
            return idx_TK
        G = self.tot_expert
        flat_idx = idx_TK.reshape(-1)
        # Order assignments by (expert, score descending, position): two stable sorts.
        by_score = torch.argsort(score_TK.detach().reshape(-1), descending=True, stable=True)
        key = flat_idx[by_score].masked_fill(flat_idx[by_score] < 0, G)  # earlier drops last
        by_expert = torch.argsort(key, stable=True)
        order = by_score[by_expert]
        sorted_key = key[by_expert]
        counts = torch.bincount(sorted_key, minlength=G + 1)
        starts = torch.cumsum(counts, 0) - counts
        rank_in_expert = torch.arange(order.numel(), device=order.device) - starts[sorted_key]
        drop_sorted = (rank_in_expert >= cap) & (sorted_key < G)
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        return flat_idx.masked_fill(drop, -1).view_as(idx_TK)


class NaiveGate(BaseGate):
    """Linear router, top-k of the logits, softmax over the k chosen (FastMoE's NaiveGate)."""

    def __init__(self, d_model, num_expert, world_size, top_k=2, *, gate_bias: bool = True, **options):
        super().__init__(d_model, num_expert, world_size, top_k, **options)
        self.gate = nn.Linear(d_model, self.tot_expert, bias=gate_bias)

    def forward(self, x_TD: torch.Tensor):
        idx_TK, score_TK = self.route(self.gate(x_TD))
        return self.apply_capacity(idx_TK, score_TK), score_TK.to(x_TD.dtype)


class NoisyGate(BaseGate):
    """Noisy top-k gating (Shazeer et al. 2017): in training, logits x W_g + N(0, 1) *
    (softplus(x W_noise) + noise_epsilon); routing and scores from the noisy logits. Unlike
    FastMoE's NoisyGate (flattened idx, [T, 1, K] score: k > 1 breaks), returns [T, K]; its
    importance/load losses are replaced by the project's balance loss on the noisy logits."""

    def __init__(self, d_model, num_expert, world_size, top_k=2, *, noise_epsilon: float = 1e-2, **options):
        super().__init__(d_model, num_expert, world_size, top_k, **options)
        self.w_gate = nn.Linear(d_model, self.tot_expert, bias=False)
        self.w_noise = nn.Linear(d_model, self.tot_expert, bias=False)
        self.noise_epsilon = noise_epsilon

    def forward(self, x_TD: torch.Tensor):
        logits_TG = self.w_gate(x_TD)
        if self.training:
            noise_std_TG = F.softplus(self.w_noise(x_TD)) + self.noise_epsilon
            logits_TG = logits_TG + torch.randn_like(logits_TG) * noise_std_TG
        idx_TK, score_TK = self.route(logits_TG)
        return self.apply_capacity(idx_TK, score_TK), score_TK.to(x_TD.dtype)


class GShardGate(NaiveGate):
    """GShard top-2 (Lepikhin et al. 2021, Algorithm 1): in training the second expert is kept
    with probability min(1, 2 * score_2) ("random routing"), then capacity (default FastMoE's
    1.2 train / 2.4 eval; None for dropless)."""

    def __init__(self, d_model, num_expert, world_size, top_k=2, *,
                 capacity=(1.2, 2.4), random_routing: bool = True, **options):
        if top_k != 2:
            raise ValueError(f"GShardGate routes to exactly 2 experts; got top_k={top_k} (set moe.top_k=2)")
        super().__init__(d_model, num_expert, world_size, top_k, capacity=capacity, **options)
        self.random_routing = random_routing

    def forward(self, x_TD: torch.Tensor):
        idx_TK, score_TK = self.route(self.gate(x_TD))
        if self.training and self.random_routing:
            drop_T = 2 * score_TK[:, 1].detach() < torch.rand(idx_TK.shape[0], device=idx_TK.device)
            idx_TK = idx_TK.clone()
            idx_TK[:, 1].masked_fill_(drop_T, -1)
        return self.apply_capacity(idx_TK, score_TK), score_TK.to(x_TD.dtype)


class SwitchGate(NaiveGate):
    """Switch Transformer top-1 (Fedus et al. 2022): score = router probability (not
    renormalised), multiplicative jitter U(1 - eps, 1 + eps) on the router input in training
    (their sec. 2.4 / Appendix; eps = 1e-2), capacity (default 1.2 train / 2.4 eval)."""

    def __init__(self, d_model, num_expert, world_size, top_k=1, *,
                 capacity=(1.2, 2.4), switch_eps: float = 1e-2, **options):
        if top_k != 1:
            raise ValueError(f"SwitchGate routes to exactly 1 expert; got top_k={top_k} (set moe.top_k=1)")
        options.pop("softmax_before_topk", None)  # Switch always scores by the probability
        super().__init__(d_model, num_expert, world_size, top_k, capacity=capacity, **options)
        self.switch_eps = switch_eps

    def forward(self, x_TD: torch.Tensor):
        if self.training and self.switch_eps > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - self.switch_eps, 1 + self.switch_eps)
        idx_TK, score_TK = self.route(self.gate(x_TD), scores_are_probs=True)
        return self.apply_capacity(idx_TK, score_TK), score_TK.to(x_TD.dtype)
