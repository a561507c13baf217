"""The MoE feed-forward block the GLM layer uses in place of its dense GeGLU FFN.

Shape legend: s sequence, b batch, h hidden (= D), F expert hidden.

Groups come from Megatron-Core's ``parallel_state`` (docs/design.md#parallel-layout):
``moe_group`` is the expert-parallel group, ``slice_group`` the tensor-parallel group
when TP > 1 (all TP ranks hold the same tokens after attention). Auxiliary losses reach the final
loss from any pipeline stage through :class:`AuxLossInjector` (docs/design.md#aux-losses).
"""

from __future__ import annotations

import itertools
from functools import partial

import torch
from megatron.core import parallel_state
from torch import nn

from moe_morpheus.config import ConfigError, ModelConfig, MoEConfig
from moe_morpheus.moe.experts import GeGLUExperts
from moe_morpheus.moe.faster import FasterMoE
from moe_morpheus.moe.faster.gate import TopologyGate
from moe_morpheus.moe.gates import BaseGate, GShardGate, NaiveGate, NoisyGate, SwitchGate
from moe_morpheus.moe.layer import FMoE

GATES = {"naive": NaiveGate, "noisy": NoisyGate, "gshard": GShardGate, "switch": SwitchGate,
         "faster": TopologyGate}


def gate_class(name: str) -> type[BaseGate]:
    """The gate class of ``moe.gate`` (``faster``: FasterMoE's topology-aware gate)."""
    if name not in GATES:
        raise ValueError(f"moe.gate={name!r} has no native gate here; choose one of {sorted(GATES)}")
    return GATES[name]


class AuxLossInjector(torch.autograd.Function):
    """Identity on the layer output in forward; in backward, feeds d(aux)/d(...) scaled by
    :attr:`loss_scale` into the graph that produced ``aux`` (the gate), as if ``scale * aux``
    had been added to the final loss. The scale is what the main loss is multiplied by
    before its backward: 1 / num_microbatches (times the fp16 loss scale), set by the trainer
    through :func:`set_aux_loss_scale` (Megatron's schedule sets its own scaler only when
    ``config.num_moe_experts`` is set, which this project's MoE does not use)."""

    loss_scale = torch.tensor(1.0)

    @staticmethod
    def forward(ctx, output, aux_loss):
        ctx.save_for_backward(aux_loss)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        (aux_loss,) = ctx.saved_tensors
        scale = AuxLossInjector.loss_scale.to(device=aux_loss.device, dtype=aux_loss.dtype)
        return grad_output, torch.ones_like(aux_loss) * scale

    @classmethod
    def set_loss_scale(cls, scale: torch.Tensor) -> None:
        cls.loss_scale = torch.as_tensor(scale, dtype=torch.float32).detach().clone()


def set_aux_loss_scale(scale: float) -> None:
    """Scale of the auxiliary-loss gradient of every MoE layer (1 / num_microbatches)."""
    AuxLossInjector.set_loss_scale(torch.tensor(float(scale)))


def _fastmoe_gate(gate: str, capacity_factor: float | None):
    """FastMoE's gate class for ``moe.gate`` (its own loss formulas; docs/design.md#fastmoe-compatibility)."""
    from fmoe import gates as fmoe_gates

    classes = {"naive": fmoe_gates.NaiveGate, "noisy": fmoe_gates.NoisyGate,
               "gshard": fmoe_gates.GShardGate, "switch": fmoe_gates.SwitchGate}
    if gate not in classes:
        raise ValueError(f"moe.gate={gate!r} has no FastMoE gate here; choose one of {sorted(classes)}")
    if capacity_factor is not None and gate in ("gshard", "switch"):
        return partial(classes[gate], capacity=(capacity_factor, capacity_factor))
    return classes[gate]


def build_fastmoe_layer(num_expert: int, d_model: int, d_hidden: int, *, world_size: int, moe_group,
                        slice_group, top_k: int, gate: str, capacity_factor: float | None,
                        std: float, first_expert: int) -> nn.Module:
    """``moe.backend=fastmoe``: FastMoE's own ``fmoe.FMoE`` with this project's GeGLU experts
    (one per FastMoE expert slot, same init as the native layer) where ``fmoe`` is importable."""
    try:
        import fmoe
    except ImportError as err:
        raise ImportError(
            "moe.backend=fastmoe needs FastMoE's `fmoe` package (laekov/fastmoe, built from source "
            "against CUDA and NCCL; not on PyPI), which cannot be imported here "
            f"({err}). Use moe.backend=native, this project's PyTorch implementation of the same layer."
        ) from err
    seed = int(torch.randint(0, 2**31 - 1, ()).item())
    expert_ids = itertools.count(first_expert)
    layer = fmoe.FMoE(
        num_expert=num_expert, d_model=d_model, world_size=world_size, moe_group=moe_group,
        slice_group=slice_group, top_k=top_k, gate=_fastmoe_gate(gate, capacity_factor),
        # FastMoE calls expert(d_model) per slot and experts[i](rows, count): a one-expert batch.
        expert=lambda d: GeGLUExperts(1, d, d_hidden, std=std, first_expert=next(expert_ids), seed=seed),
    )
    for p in layer.experts.parameters():
        p.allreduce = False
    for p in layer.gate.parameters():
        p.sequence_parallel = True
    return layer


def _groups():
    """(ep, ep rank, ep group, tp, tp group) from Megatron-Core; a world of one when unset."""
    if not parallel_state.model_parallel_is_initialized():
        return 1, 0, None, 1, None
    ep = parallel_state.get_expert_model_parallel_world_size()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    return (ep, parallel_state.get_expert_model_parallel_rank(),
            parallel_state.get_expert_model_parallel_group() if ep > 1 else None,
            tp, parallel_state.get_tensor_model_parallel_group() if tp > 1 else None)


class MoEFeedForward(nn.Module):
    """MoE FFN on Megatron-layout [s, b, h] tensors; returns the output only, same shape.

    ``sequence_parallel=True``: the input is already this TP rank's part of the sequence
    (Megatron's sequence parallelism), so there is nothing to slice or gather.
    Experts: ``moe.num_experts / ep`` GeGLU experts of hidden ``moe.expert_hidden(model)`` (the
    dense FFN's / ``moe.granularity``, or ``moe.expert_hidden_size``), drawn with the dense FFN's
    std (``ModelConfig.output_init_std``). The auxiliary
    loss ``aux_loss_coeff * balance + z_loss_coeff * z`` is attached to the output in training.
    ``layer_number`` names the layer's statistics (set by the model).
    """

    def __init__(self, model_cfg: ModelConfig, moe_cfg: MoEConfig, *, sequence_parallel: bool = False):
        super().__init__()
        ep, ep_rank, moe_group, tp, tp_group = _groups()
        if moe_cfg.num_experts % ep:
            raise ConfigError(f"moe.num_experts={moe_cfg.num_experts} is not divisible by the expert-parallel "
                              f"size parallel.ep={ep}: each rank must hold the same number of experts")
        num_expert = moe_cfg.num_experts // ep
        d_model = model_cfg.hidden_size
        d_hidden = moe_cfg.expert_hidden(model_cfg)
        slice_group = tp_group if tp > 1 and not sequence_parallel else None
        # The dense FFN's std: under pre-LN the experts once drew Xavier gain 1 (0.0625-0.079 on
        # glm_tiny) against the dense FFN's 0.02 / sqrt(8) = 0.0071, and every MoE arm of the
        # studies started 9-11x larger than dense (one full-width expert trained behind dense).
        std = model_cfg.output_init_std(d_model, d_hidden)
        faster = moe_cfg.faster
        if moe_cfg.backend == "fastmoe":
            if faster.schedule or faster.shadow or moe_cfg.gate == "faster":
                raise ConfigError("moe.faster.* and gate=faster run on moe.backend=native; FastMoE's own "
                                  "FasterMoE is switched by its FMOE_FASTER_* environment variables")
            self.moe = build_fastmoe_layer(
                num_expert, d_model, d_hidden, world_size=ep, moe_group=moe_group, slice_group=slice_group,
                top_k=moe_cfg.top_k, gate=moe_cfg.gate, capacity_factor=moe_cfg.capacity_factor,
                std=std, first_expert=ep_rank * num_expert)
        else:
            gate = partial(gate_class(moe_cfg.gate), capacity=moe_cfg.capacity_factor,
                           softmax_before_topk=moe_cfg.softmax_before_topk)
            if moe_cfg.gate == "faster":
                gate = partial(gate, ranks_per_node=faster.ranks_per_node,
                               outgoing_fraction=faster.outgoing_fraction, moe_group=moe_group)
            experts = GeGLUExperts(num_expert, d_model, d_hidden, std=std, first_expert=ep_rank * num_expert)
            self.moe = FMoE(num_expert, d_model, world_size=ep, moe_group=moe_group, slice_group=slice_group,
                            top_k=moe_cfg.top_k, gate=gate, expert=experts)
            if faster.schedule or faster.shadow:
                self.moe.faster = FasterMoE(self.moe, schedule=faster.schedule, group_size=faster.group_size,
                                            shadow=faster.shadow, net_bandwidth=faster.net_bandwidth,
                                            flops=faster.flops)
            if tp > 1 and sequence_parallel:
                # TP ranks hold disjoint parts of one micro-batch, as slice ranks do: the balance
                # and z-losses are taken over the whole micro-batch, so TP=2 matches TP=1.
                self.moe.gate.loss_group = tp_group
        self.aux_loss_coeff = moe_cfg.aux_loss_coeff
        self.z_loss_coeff = moe_cfg.z_loss_coeff
        self.layer_number: int | None = None

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (), metadata: dict | None = None) -> dict:
        """Checkpoint entries (Megatron-Core ``dist_checkpointing``) that reshard across EP.

        Expert parameters (``allreduce = False``) hold this rank's ``E / ep`` experts: batched
        ``[E_local, ...]`` tensors are one global ``[E, ...]`` tensor split along dim 0 at offset
        ``ep_rank * E_local``; per-expert modules (``experts.<e>.*``, the fastmoe backend) are
        renamed to their global expert index. Their copies on the expert-data-parallel ranks are
        replicas (replica id = rank there). Gate parameters are identical on every rank:
        replicated, as Megatron's default does for plain tensors.
        """
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        if sharded_offsets:
            raise ValueError("MoEFeedForward is checkpointed per layer (GLMModel): it takes no outer sharded_offsets")
        ep, ep_rank = _groups()[:2]
        edp_rank = (parallel_state.get_expert_data_parallel_rank()
                    if parallel_state.model_parallel_is_initialized() else 0)
        replicated, entries = {}, {}
        for name, param in self.state_dict(prefix="", keep_vars=True).items():
            if getattr(param, "allreduce", True):
                replicated[name] = param
                continue
            parts = name.split(".")
            expert_at = parts.index("experts") + 1
            if parts[expert_at].isdigit():
                parts[expert_at] = str(ep_rank * len(self.moe.experts) + int(parts[expert_at]))
                entries[prefix + name] = ShardedTensor.from_rank_offsets(
                    prefix + ".".join(parts), param, replica_id=edp_rank)
            else:
                entries[prefix + name] = ShardedTensor.from_rank_offsets(
                    prefix + name, param, (0, ep_rank, ep), replica_id=edp_rank)
        entries.update(make_sharded_tensors_for_checkpoint(
            replicated, prefix,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            dp_cp_group=parallel_state.get_data_parallel_group(with_context_parallel=True)))
        return entries

    def forward(self, hidden_sbh: torch.Tensor) -> torch.Tensor:
        out_sbh = self.moe(hidden_sbh.reshape(-1, hidden_sbh.shape[-1])).reshape(hidden_sbh.shape)
        aux = self._aux_loss()
        if aux is not None and torch.is_grad_enabled() and out_sbh.requires_grad:
            out_sbh = AuxLossInjector.apply(out_sbh, aux)
        return out_sbh

    def _aux_loss(self) -> torch.Tensor | None:
        # Always take (and clear) the gate's losses so no graph outlives its step.
        gate = self.moe.gate
        balance = gate.get_loss(clear=True) if getattr(gate, "has_loss", False) else None
        z = gate.get_z_loss(clear=True) if hasattr(gate, "get_z_loss") else None
        terms = []
        if balance is not None and self.aux_loss_coeff > 0:
            terms.append(self.aux_loss_coeff * balance)
        if z is not None and self.z_loss_coeff > 0:
            terms.append(self.z_loss_coeff * z)
        return sum(terms) if terms else None
