"""FMoE: FastMoE's layer (He et al. 2021; docs/design.md#moe-layer) in PyTorch, on any torch.distributed backend.

Shape legend: T tokens, D model dim, K top-k, G experts in total, E local experts (``num_expert``),
W ranks of the expert-parallel group, N rows of an expert-sorted buffer (kept assignments).

Data flow of one forward, per rank (FastMoE's ``_fmoe_general_global_forward`` without its CUDA
kernels):

1. ``slice_group`` of S ranks holding the same tokens (tensor-parallel ranks): keep own rows
   (chunks of ceil(T / S); FastMoE's T // S drops the remainder).
2. gate -> idx [T, K] (global expert ids, -1 = dropped), score [T, K].
3. dispatch by ONE stable argsort of the T * K expert ids: row n of the sorted buffer is token
   ``order[n] // K``; dropped assignments sort last and are cut off. ``index_select`` gathers
   the tokens (its backward, ``index_add``, sums the K copies of each token's gradient).
4. W > 1: the per-expert counts are exchanged first (all-to-all of E-sized blocks), then the
   rows (``all_to_all_single`` with those splits). Received rows come grouped by (source rank,
   local expert); one permutation makes them (local expert, source rank) for the experts.
5. experts on the sorted buffer (batched weights: grouped GEMMs over the experts' row blocks).
6. the way back mirrors 4, and the combine is ONE weighted ``index_add``:
   out[t] = sum_k score[t, k] * expert_{idx[t, k]}(x[t]); dropped assignments add nothing.
7. slice group: all-gather the slices (backward: own rows).

Global expert g lives on rank g // E of ``moe_group`` as local expert g % E.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moe_morpheus.moe.comm import AllGather, AllToAll, Slice, exchange_counts, slice_bounds
from moe_morpheus.moe.experts import expert_segments
from moe_morpheus.moe.gates import NaiveGate


def routing_stats(load: list[float], dropped: float, routed: float,
                  losses: tuple[float, float] | None = None) -> dict:
    """One layer's routing statistics from its (token, slot) counts: ``load`` as given (per
    global expert; the caller decides whether per forward or summed), ``drop_rate`` = dropped /
    routed assignments, ``load_max_over_mean`` (1 = balanced; the same for a per-forward mean
    or a sum), and, given the balance and z-losses per forward, ``balance_loss`` and ``z_loss``."""
    mean_load = sum(load) / len(load)
    stats = {"load": load, "drop_rate": dropped / routed if routed else 0.0,
             "load_max_over_mean": max(load) / mean_load if mean_load else 0.0}
    if losses is not None:
        stats.update(balance_loss=losses[0], z_loss=losses[1])
    return stats


def _group_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


class FMoE(nn.Module):
    """FastMoE-compatible MoE layer (docs/design.md#fastmoe-compatibility, #public-contracts).

    ``num_expert``: experts on this rank (the gate scores ``num_expert * world_size``).
    ``expert``: an ``nn.Module`` of batched experts called as ``expert(x_ND, counts_E)`` (e.g.
    :class:`~moe_morpheus.moe.experts.GeGLUExperts`, FastMoE's "fused" mode); a class (or a list
    of ``num_expert`` classes) instantiated as ``cls(d_model)`` per expert and called on each
    expert's rows; or None, FastMoE's mode where a subclass sets ``self.experts`` (and then calls
    :meth:`mark_parallel_comm`). ``experts[i](x)`` applies local expert i to [T, D].
    ``gate``: constructed as ``gate(d_model, num_expert, world_size, top_k)``; options through
    ``functools.partial``. ``gate_hook(idx, score, None)`` runs after the gate.
    ``mask`` [T] and ``mask_dict`` {key: [K, D] or broadcastable}: tokens with mask != 0 are not
    routed; a token whose mask equals a key gets sum_k score[t, k] * mask_dict[key][k], others
    zero (FastMoE's semantics). ``moe_group=None`` with ``world_size > 1`` is the world group.

    Parameter marks for Megatron-Core: expert parameters ``allreduce = False`` (DDP reduces them
    over the expert-data-parallel group only); gate parameters ``sequence_parallel = True``
    (slice ranks route different tokens, so their gate gradients must be summed over the
    tensor-parallel group). Megatron-Core 0.16.1's ``finalize_model_grads`` sums parameters with
    this mark only when ``TransformerConfig.sequence_parallel`` is True; otherwise the trainer
    must all-reduce (sum) the gate gradients over the tensor-parallel group itself.
    """

    def __init__(self, num_expert, d_model, world_size=1, moe_group=None, slice_group=None,
                 top_k=2, gate=NaiveGate, expert=None, gate_hook=None, mask=None, mask_dict=None):
        super().__init__()
        if isinstance(expert, (list, tuple)):
            num_expert = len(expert)  # FastMoE: a list of classes sets num_expert
        if num_expert < 1 or d_model < 1 or world_size < 1:
            raise ValueError(f"FMoE needs num_expert, d_model, world_size >= 1; got {num_expert}, "
                             f"{d_model}, {world_size}")
        self.num_expert, self.d_model, self.world_size, self.top_k = num_expert, d_model, world_size, top_k
        self.tot_expert = num_expert * world_size
        if not 1 <= top_k <= self.tot_expert:
            raise ValueError(f"top_k={top_k} is larger than the number of experts {self.tot_expert} "
                             f"(num_expert={num_expert} per rank x world_size={world_size}) or < 1")
        if world_size > 1 and not dist.is_initialized():
            raise RuntimeError(f"world_size={world_size} needs torch.distributed to be initialised "
                               f"(init_process_group) before building FMoE")
        group_size = (dist.get_world_size(moe_group) if dist.is_initialized() and (world_size > 1 or moe_group is not None)
                      else 1)
        if group_size != world_size:
            raise ValueError(f"world_size={world_size} does not match moe_group's size {group_size}: "
                             f"world_size is the number of ranks the experts are spread over")
        self.moe_group = moe_group
        self.slice_group = slice_group
        self.slice_size = _group_size(slice_group)
        if (mask is None) != (mask_dict is None):
            raise ValueError("mask and mask_dict go together (FastMoE): give both or neither")
        self.mask, self.mask_dict = mask, mask_dict
        self.gate_hook = gate_hook

        self.gate = gate(d_model, num_expert, world_size, top_k)
        if self.slice_size > 1 and hasattr(self.gate, "loss_group"):
            self.gate.loss_group = slice_group
        if expert is None:
            self.experts = None
        elif isinstance(expert, nn.Module):
            if len(expert) != num_expert:
                raise ValueError(f"batched expert module holds {len(expert)} experts, num_expert={num_expert}")
            self.experts = expert
        elif isinstance(expert, (list, tuple)):
            self.experts = nn.ModuleList([cls(d_model) for cls in expert])
        else:
            self.experts = nn.ModuleList([expert(d_model) for _ in range(num_expert)])
        self.mark_parallel_comm()
        # FasterMoE (moe_morpheus.moe.faster.FasterMoE): smart schedule / dynamic shadowing.
        self.faster = None
        # Whether a forward adds its routing statistics (:meth:`take_stats`). The model turns it
        # off for the recompute pass of full activation recomputation, which repeats a forward
        # that was already counted.
        self.record_stats = True
        self.reset_stats()

    def mark_parallel_comm(self) -> None:
        """Tag parameters for Megatron-Core's DDP and ``finalize_model_grads`` (class docstring)."""
        if self.experts is not None:
            for p in self.experts.parameters():
                p.allreduce = False
        for p in self.gate.parameters():
            p.sequence_parallel = True

    # ---- forward -------------------------------------------------------------------------
    def forward(self, inp: torch.Tensor) -> torch.Tensor:
        if inp.shape[-1] != self.d_model:
            raise ValueError(f"input's last dimension is {inp.shape[-1]}, but the layer's d_model is "
                             f"{self.d_model}")
        if self.experts is None:
            raise RuntimeError("FMoE built with expert=None: a subclass must set self.experts")
        x_TD = inp.reshape(-1, self.d_model)
        num_tokens = x_TD.shape[0]
        mask_T = None
        if self.mask is not None:
            mask_T = self.mask.reshape(-1)
            if mask_T.numel() != num_tokens:
                raise ValueError(f"mask has {mask_T.numel()} entries for {num_tokens} tokens")
        if self.slice_size > 1:
            x_TD = Slice.apply(x_TD, self.slice_group)
            if mask_T is not None:
                start, end = slice_bounds(num_tokens, dist.get_rank(self.slice_group), self.slice_size)
                mask_T = mask_T[start:end]

        idx_TK, score_TK = self.gate(x_TD)
        if self.gate_hook is not None:
            self.gate_hook(idx_TK, score_TK, None)
        self._check_routing(idx_TK, score_TK, x_TD.shape[0])
        route_TK = idx_TK if mask_T is None else idx_TK.masked_fill((mask_T != 0)[:, None], -1)

        y_TD, kept_G = self._dispatch_combine(x_TD, route_TK, score_TK)
        if mask_T is not None:
            y_TD = y_TD + self._masked_rows(mask_T, score_TK, y_TD)
        if self.record_stats:
            self._record_stats(idx_TK, mask_T, kept_G)
        if self.slice_size > 1:
            y_TD = AllGather.apply(y_TD, num_tokens, self.slice_group)
        return y_TD.reshape(inp.shape)

    def _check_routing(self, idx_TK, score_TK, num_tokens) -> None:
        expected = (num_tokens, self.top_k)
        if tuple(idx_TK.shape) != expected or tuple(score_TK.shape) != expected:
            raise ValueError(f"gate returned idx {tuple(idx_TK.shape)} and score {tuple(score_TK.shape)}; "
                             f"expected [tokens, top_k] = {list(expected)}")
        if idx_TK.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"gate returned idx of dtype {idx_TK.dtype}; expected integer expert ids")
        if idx_TK.numel():
            lo, hi = (int(v) for v in torch.aminmax(idx_TK))
            if lo < -1 or hi >= self.tot_expert:
                raise ValueError(f"gate returned expert indices in [{lo}, {hi}], outside [-1, "
                                 f"{self.tot_expert - 1}] ({self.tot_expert} experts, -1 = dropped)")

    def _dispatch_combine(self, x_TD, idx_TK, score_TK):
        T, K = idx_TK.shape
        G = self.tot_expert
        flat_K = idx_TK.reshape(-1).long()
        key = flat_K.masked_fill(flat_K < 0, G)  # dropped assignments sort last, then are cut
        kept_G = torch.bincount(key, minlength=G + 1)[:G]
        shadow = self.faster.plan(kept_G) if self.faster is not None else []
        if shadow:  # FasterMoE: shadowed experts' rows sort after all others, computed here
            remap = torch.arange(G + 1, device=key.device)
            remap[shadow] = G + torch.arange(len(shadow), device=key.device)
            remap[G] = G + len(shadow)
            key = remap[key]
        order = torch.argsort(key, stable=True)
        counts = kept_G.tolist()
        order_N = order[: sum(counts)]
        token_N = torch.div(order_N, K, rounding_mode="floor")
        x_ND = x_TD.index_select(0, token_N)
        if self.world_size == 1:
            y_ND = self._run_experts(x_ND, counts)
        elif shadow:
            main_G = kept_G.clone()
            main_G[shadow] = 0
            n_main = sum(counts) - sum(counts[g] for g in shadow)
            y_ND = torch.cat([self._exchange_and_run(x_ND[:n_main], main_G, shadow),
                              self.faster.run_shadow(shadow, x_ND[n_main:], [counts[g] for g in shadow])])
        else:
            y_ND = self._exchange_and_run(x_ND, kept_G, shadow)
        weight_N = score_TK.reshape(-1).index_select(0, order_N).to(y_ND.dtype)
        y_TD = y_ND.new_zeros(T, y_ND.shape[-1]).index_add(0, token_N, y_ND * weight_N[:, None])
        return y_TD, kept_G

    def _exchange_and_run(self, x_ND, kept_G, shadow: list[int]):
        W, E = self.world_size, self.num_expert
        send_WE = kept_G.view(W, E)
        planned = self.faster is not None and self.faster.load_WG is not None
        recv_WE = self.faster.received(shadow) if planned else exchange_counts(send_WE, self.moe_group)
        if self.faster is not None and self.faster.scheduled:
            return self.faster.exchange(x_ND, send_WE, recv_WE)
        send_splits, recv_splits = send_WE.sum(1).tolist(), recv_WE.sum(1).tolist()
        x_recv = AllToAll.apply(x_ND, recv_splits, send_splits, self.moe_group)
        # Received rows: blocks (source w, local expert e), w-major; the experts need e-major.
        device = recv_WE.device  # on a GPU the counts (and so the permutation) live there too
        block_R = torch.repeat_interleave(torch.arange(W * E, device=device), recv_WE.reshape(-1))
        perm_R = torch.argsort((block_R % E) * W + block_R // E, stable=True).to(x_recv.device)
        inverse_R = torch.empty_like(perm_R)
        inverse_R[perm_R] = torch.arange(perm_R.numel(), device=perm_R.device)
        y_local = self._run_experts(x_recv.index_select(0, perm_R), recv_WE.sum(0).tolist())
        return AllToAll.apply(y_local.index_select(0, inverse_R), send_splits, recv_splits, self.moe_group)

    def _run_experts(self, x_ND, counts_E: list[int]):
        if not isinstance(self.experts, nn.ModuleList):
            return self.experts(x_ND, counts_E)
        outs = [self.experts[e](x_ND[s:s + n]) for e, s, n in expert_segments(counts_E)]
        return torch.cat(outs) if outs else x_ND[:0]

    def _masked_rows(self, mask_T, score_TK, y_TD):
        extra_TD = torch.zeros_like(y_TD)
        for key, value in self.mask_dict.items():
            value_KD = torch.as_tensor(value, dtype=y_TD.dtype).expand(self.top_k, self.d_model)
            rows_T = (mask_T == key)[:, None]
            extra_TD = extra_TD + rows_T * (score_TK.to(y_TD.dtype) @ value_KD)
        return extra_TD

    # ---- load statistics -----------------------------------------------------------------
    def reset_stats(self) -> None:
        self._stat_forwards = 0
        self._stat_counts = None  # float64 [G + 2]: kept per expert, dropped, assignments
        self._stat_losses = None  # float32 [2]: balance, z

    def _record_stats(self, idx_TK, mask_T, kept_G) -> None:
        """Accumulate detached statistics of this rank's own rows (its slice under a slice
        group); no host sync and no collective here: :meth:`take_stats` hands them out."""
        live_TK = torch.ones_like(idx_TK, dtype=torch.bool)
        if mask_T is not None:
            live_TK = live_TK & (mask_T == 0)[:, None]
        dropped = ((idx_TK < 0) & live_TK).sum()
        counts = torch.cat([kept_G.double(), torch.stack([dropped, live_TK.sum()]).double()])
        self._stat_counts = counts if self._stat_counts is None else self._stat_counts + counts
        balance, z = getattr(self.gate, "loss_value", None), getattr(self.gate, "z_loss_value", None)
        if balance is not None:
            losses = torch.stack([balance, z])
            self._stat_losses = losses if self._stat_losses is None else self._stat_losses + losses
        self._stat_forwards += 1

    def take_stats(self) -> tuple[int, torch.Tensor, torch.Tensor | None] | None:
        """This rank's raw statistics since the last call, then reset; None if no forward ran.

        ``(forwards, counts, losses)``: ``counts`` float64 [G + 2], (token, slot) assignments
        kept per global expert, then dropped and routed ones (masked tokens are not routed),
        summed over forwards, of this rank's own rows only (a slice rank's share); ``losses``
        [2] the gate's balance and z-losses summed over forwards (None if the gate has none).
        Counts are sums, so a sum over ranks that routed disjoint tokens is the count of all
        of them (:meth:`pop_stats` sums over the slice group, ``collect_moe_stats`` over every
        rank)."""
        n = self._stat_forwards
        counts, losses = self._stat_counts, self._stat_losses
        self.reset_stats()
        return None if n == 0 else (n, counts, losses)

    def pop_stats(self) -> dict | None:
        """This layer's statistics since the last call (micro-batches), then reset; None if no
        forward ran. For a look at one layer (tests, benchmarks); training logs
        ``collect_moe_stats``, which uses the same :func:`routing_stats` but sums ``load`` over
        forwards and ranks instead. Collective over the slice group: the counts are summed over
        it, so the stats describe the whole micro-batch, like the balance loss. ``load``:
        assignments kept per global expert, the MEAN per forward (not the sum over forwards);
        ``drop_rate``: fraction of (token, slot) assignments the gate dropped (capacity, or
        GShard's random routing of the second slot); ``load_max_over_mean``: 1 = balanced;
        ``balance_loss``, ``z_loss``: means per forward."""
        taken = self.take_stats()
        if taken is None:
            return None
        n, counts, losses = taken
        if self.slice_size > 1:
            dist.all_reduce(counts, group=self.slice_group)
        counts = counts.tolist()
        dropped, assigned = counts[self.tot_expert:]
        stats = routing_stats([c / n for c in counts[: self.tot_expert]], dropped, assigned,
                              None if losses is None else tuple(v / n for v in losses.tolist()))
        if self.faster is not None:
            stats.update(self.faster.pop_stats())
        return stats
