"""Mixture-of-Experts layers: gate, experts, capacity, FasterMoE."""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_morpheus.config.errors import ConfigError, check
from moe_morpheus.config.model import ModelConfig

GATES = ("naive", "noisy", "gshard", "switch", "faster")


def divisors_near(n: int, target: float, count: int = 3) -> list[int]:
    """The ``count`` divisors of ``n`` closest to ``target``, ascending: the granularities an
    error message suggests instead of one that does not divide the FFN."""
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    return sorted(sorted(divisors, key=lambda d: abs(d - target))[:count])


@dataclass
class FasterMoEConfig:
    """FasterMoE (PPoPP'22): smart schedule, dynamic shadowing, topology-aware gate
    (``moe_morpheus.moe.faster``; docs/design.md#fastermoe)."""

    # Allow the smart schedule (the token exchange in W / group_size steps, each overlapped with
    # expert compute) and dynamic shadowing; the policy takes either, per layer and forward, only
    # where its calibrated model predicts a saving of at least 10% (moe/faster/policy.py).
    schedule: bool = False
    group_size: int = 1  # must divide the expert-parallel size (checked when the layer is built)
    shadow: bool = False
    # The policy's performance model: bytes/s of the expert-parallel network and expert FLOP/s;
    # null = measured on the first forward on the actual backend (moe/faster/calibrate.py), with
    # the fixed costs of a collective and of an expert call; a value given has no fixed cost.
    net_bandwidth: float | None = None
    flops: float | None = None
    # gate: faster (congestion-avoiding selection): ranks sharing a node, and the fraction of a
    # rank's tokens whose top-1 expert may stay off-node (FastMoE's defaults 8 and 0.14).
    ranks_per_node: int = 8
    outgoing_fraction: float = 0.14

    def __post_init__(self) -> None:
        check(self.group_size >= 1, f"moe.faster.group_size={self.group_size} must be >= 1")
        for name in ("net_bandwidth", "flops"):
            value = getattr(self, name)
            check(value is None or value > 0, f"moe.faster.{name}={value} must be positive (or null: measure)")
        check(self.ranks_per_node >= 1, f"moe.faster.ranks_per_node={self.ranks_per_node} must be >= 1")
        check(0.0 <= self.outgoing_fraction <= 1.0,
              f"moe.faster.outgoing_fraction={self.outgoing_fraction} must be in [0, 1]")


@dataclass
class MoEConfig:
    """Which FFN layers are Mixture-of-Experts, and how they route."""

    # Layer i (0-based) is MoE iff layer_freq > 0 and (i + 1) % layer_freq == 0; 0 = dense model.
    layer_freq: int = 0
    num_experts: int = 8  # total over the expert-parallel group
    top_k: int = 2
    gate: str = "naive"
    # Expert width relative to the dense FFN, as Megatron-Core and He et al. (2024) define
    # granularity: expert hidden = model.ffn_hidden / g, so top_k = g experts hold exactly the
    # dense FFN's active parameters and FLOPs on every model preset. None: g = 1 (every expert as
    # wide as the dense FFN, so a dense FFN can be copied into each).
    granularity: int | None = None
    # An absolute expert hidden size, only when asked for explicitly; setting it and granularity
    # together is an error. Read the width through expert_hidden(model), never these fields.
    expert_hidden_size: int | None = None
    # None: dropless. Otherwise ceil(capacity_factor * T_local * k / E) per sender and expert.
    capacity_factor: float | None = None
    # Route by softmax over all experts, then top-k (He et al. 2024), instead of top-k then softmax.
    softmax_before_topk: bool = False
    aux_loss_coeff: float = 1e-2
    z_loss_coeff: float = 0.0
    # native: this project's PyTorch FMoE; fastmoe: the real `fmoe` package where installed.
    backend: str = "native"
    faster: FasterMoEConfig = field(default_factory=FasterMoEConfig)

    def __post_init__(self) -> None:
        check(self.layer_freq >= 0, f"moe.layer_freq={self.layer_freq} must be >= 0 (0 = dense)")
        check(self.gate in GATES, f"moe.gate={self.gate!r}: choose one of {GATES}")
        check(self.backend in ("native", "fastmoe"), f"moe.backend={self.backend!r}: native or fastmoe")
        check(self.granularity is None or self.expert_hidden_size is None,
              f"moe.granularity={self.granularity} and moe.expert_hidden_size={self.expert_hidden_size} are "
              f"both set: the expert width is ffn_hidden_size / granularity or an absolute size, not both; "
              f"set moe.granularity=null to use the absolute width")
        check(self.granularity is None or self.granularity >= 1,
              f"moe.granularity={self.granularity} must be >= 1 (expert hidden = ffn_hidden_size / granularity)")
        check(self.expert_hidden_size is None or self.expert_hidden_size >= 1,
              f"moe.expert_hidden_size={self.expert_hidden_size} must be >= 1 (or null)")
        if self.layer_freq == 0:
            return
        check(self.num_experts >= 1, f"moe.num_experts={self.num_experts} must be >= 1")
        check(1 <= self.top_k <= self.num_experts,
              f"moe.top_k={self.top_k} must be between 1 and moe.num_experts={self.num_experts}")
        check(self.capacity_factor is None or self.capacity_factor > 0,
              f"moe.capacity_factor={self.capacity_factor} must be positive (or null for dropless)")
        check(self.aux_loss_coeff >= 0 and self.z_loss_coeff >= 0, "MoE loss coefficients must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.layer_freq > 0

    def is_moe_layer(self, layer_index: int) -> bool:
        return self.layer_freq > 0 and (layer_index + 1) % self.layer_freq == 0

    def expert_hidden(self, model: ModelConfig) -> int:
        """Each expert's GeGLU hidden size on ``model``: ``expert_hidden_size`` when set, else
        ``model.ffn_hidden / granularity`` (which must divide it)."""
        if self.expert_hidden_size is not None:
            return self.expert_hidden_size
        g, ffn = self.granularity or 1, model.ffn_hidden
        if ffn % g:
            divisors = ", ".join(str(d) for d in divisors_near(ffn, g))
            raise ConfigError(f"moe.granularity={g} does not divide model.ffn_hidden_size={ffn}: pick one of its "
                              f"divisors near {g} ({divisors}) or set model.ffn_hidden_size to a multiple of {g}")
        return ffn // g
