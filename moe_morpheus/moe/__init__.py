"""Mixture-of-Experts: FastMoE-compatible layer, gates, experts, and the GLM MoE FFN block."""

from moe_morpheus.moe import gates
from moe_morpheus.moe.experts import GeGLUExperts
from moe_morpheus.moe.ffn import AuxLossInjector, MoEFeedForward, set_aux_loss_scale
from moe_morpheus.moe.gates import GShardGate, NaiveGate, NoisyGate, SwitchGate
from moe_morpheus.moe.layer import FMoE
from moe_morpheus.moe.stats import collect_moe_stats

__all__ = [
    "FMoE", "GeGLUExperts", "MoEFeedForward", "AuxLossInjector", "collect_moe_stats", "set_aux_loss_scale",
    "gates", "NaiveGate", "NoisyGate", "GShardGate", "SwitchGate",
]
