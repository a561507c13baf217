"""Upcycling: how a dense FFN becomes a MoE layer, where a run's weights come from, and the
staged upcycle-vs-scratch sweep (moe_morpheus/upcycle/)."""

from __future__ import annotations

from dataclasses import dataclass

from moe_morpheus.config.cli import option
from moe_morpheus.config.errors import ConfigError
from moe_morpheus.config.model import ModelConfig
from moe_morpheus.config.moe import MoEConfig, divisors_near

MODES = ("copy", "virtual_group", "he_scaling", "drop")
ROUTER_INITS = ("tied", "untied")


class UpcycleError(ConfigError):
    """A source or target that cannot be upcycled; the message names the field or the path."""


@dataclass
class UpcycleConfig:
    """How a dense FFN becomes a MoE layer (module docstring)."""

    mode: str = "virtual_group"
    drop_fraction: float = 0.5  # Nakamura et al.'s best r
    router_init: str = "tied"
    # None: model.init_std.
    router_std: float | None = None
    # Seed of the router rows and Drop-Upcycling's draws. None: the run's trainer.seed (resolved
    # by ExperimentConfig.seeds); set it to pin the conversion across seeds.
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UpcycleError(f"upcycle.mode={self.mode!r}: choose one of {MODES}")
        if self.router_init not in ROUTER_INITS:
            raise UpcycleError(f"upcycle.router_init={self.router_init!r}: choose one of {ROUTER_INITS}")
        if not 0.0 <= self.drop_fraction <= 1.0:
            raise UpcycleError(f"upcycle.drop_fraction={self.drop_fraction} must be in [0, 1]")
        if self.router_std is not None and self.router_std <= 0:
            raise UpcycleError(f"upcycle.router_std={self.router_std} must be positive (or null)")


@dataclass
class InitConfig:
    """Where a run's weights come from: None = random init (or its own checkpoints)."""

    # A dense checkpoint (step_* folder or checkpoints folder) converted per ``upcycle``.
    from_dense: str | None = None


def granularity(model: ModelConfig, moe: MoEConfig, cfg: UpcycleConfig) -> int:
    """g = dense FFN / expert width (the target's ``moe.expert_hidden``), checked against the FFN
    size, the experts and the routing; raises UpcycleError."""
    ffn = model.ffn_hidden
    expert = moe.expert_hidden(model)
    if ffn % expert:
        raise UpcycleError(f"moe.expert_hidden_size={expert} does not divide model.ffn_hidden_size={ffn}: each "
                           f"expert takes ffn / g of the dense FFN's hidden units; set moe.expert_hidden_size=null "
                           f"and moe.granularity to one of {divisors_near(ffn, ffn / expert)} instead")
    g = ffn // expert
    if moe.num_experts % g:
        raise UpcycleError(f"moe.num_experts={moe.num_experts} is not divisible by the granularity {g}: "
                           f"every group holds one copy of each of the g shards")
    if cfg.mode == "copy" and g != 1:
        raise UpcycleError(f"upcycle.mode=copy makes every expert the whole dense FFN (granularity 1) but "
                           f"the experts are {expert} wide (granularity {g}): use mode=virtual_group or "
                           f"moe.granularity=1")
    if cfg.mode in ("copy", "virtual_group"):
        if moe.softmax_before_topk:
            raise UpcycleError(f"upcycle.mode={cfg.mode} is function-preserving only with renormalised top-k "
                               f"scores; moe.softmax_before_topk=true leaves them summing to < 1: set it false "
                               f"(or use mode=he_scaling)")
        if moe.capacity_factor is not None:
            raise UpcycleError(f"upcycle.mode={cfg.mode} is function-preserving only without dropped tokens: "
                               f"set moe.capacity_factor=null (dropless)")
        if moe.top_k % g:
            raise UpcycleError(f"moe.top_k={moe.top_k} is not a multiple of the granularity {g}: the top-k must "
                               f"take whole groups (one copy of every shard) to reproduce the dense FFN")
    if g > 1 and cfg.router_init != "tied" and cfg.mode == "virtual_group":
        raise UpcycleError("upcycle.mode=virtual_group needs upcycle.router_init=tied: untied rows would route "
                           "to shards of different groups")
    if moe.gate not in ("naive", "switch") and cfg.mode in ("copy", "virtual_group"):
        # Noisy / GShard / FasterMoE gates perturb or redistribute the top-k in training.
        raise UpcycleError(f"upcycle.mode={cfg.mode} is function-preserving with moe.gate=naive; "
                           f"moe.gate={moe.gate} perturbs the routing")
    return g


@dataclass
class SweepConfig:
    """The staged upcycle-vs-scratch sweep, ``python -m moe_morpheus.upcycle.sweep [key=value ...]``
    (not a Hydra multirun: its stages depend on each other)."""

    name: str = option("upcycle_vs_scratch", help="the sweep's name: MLflow tag `sweep`, run-name prefix")
    # A verdict needs >= 3 paired seeds (moe_morpheus/report/stats.py).
    seeds: list[int] = option(factory=lambda: [1, 2, 3], help="seeds; each drives a run's init, data order and "
                                                             "upcycling draws")
    dense_experiment: str = option("dense", help="experiment of the dense stage")
    # 64 experts, virtual group g = 2: a function-preserving handoff.
    moe_experiment: str = option("upcycle_64e", help="MoE target the dense checkpoint is upcycled into")
    scratch_experiment: str = option("moe_64e", help="the same MoE shape, trained from random init")
    # 1.2% of its Chinchilla budget: 226 steps of 2,048 tokens, ~2 min on 2 cores.
    dense_fraction: float = option(0.012, help="length of the dense stage, as a fraction of its Chinchilla budget")
    # 50% and 100% of the dense stage's compute (Komatsuzaki et al. 2022 found upcycling ahead of
    # scratch up to ~100-120% extra). Per seed: dense 0.012 + 3 x (0.006 + 0.012) + scratch_total
    # (0.018 + 0.030) = 0.114 of a budget, ~20-30 min with evaluation: the three seeds (27 runs)
    # take about 1.5 hours on a 2-core CPU.
    extra_fractions: list[float] = option(factory=lambda: [0.006, 0.012],
                                          help="compute after the handoff, as fractions of a Chinchilla budget")
    stage_steps: int | None = option(None, help="every stage exactly this many steps instead (tests, smoke runs)")
    output_dir: str = option("outputs/upcycle_vs_scratch", help="folder of the stages' runs and summary")
    tracking_uri: str | None = option(None, help="MLflow URI; null: sqlite:///mlflow.db in the launch folder")
    tracking_experiment: str = option("moe_morpheus", help="MLflow experiment")
    overrides: list[str] = option(factory=list, help="overrides passed to every train.py job, e.g. "
                                                     "[trainer.micro_batch_size=4]")

    def __post_init__(self) -> None:
        if not self.seeds or not self.extra_fractions:
            raise ConfigError("upcycle_sweep: seeds and extra_fractions must not be empty")
        if self.dense_fraction <= 0 or min(self.extra_fractions) <= 0:
            raise ConfigError("upcycle_sweep: dense_fraction and extra_fractions must be positive")
        if self.stage_steps is not None and self.stage_steps < 1:
            raise ConfigError(f"upcycle_sweep: stage_steps={self.stage_steps} must be >= 1 (or null)")
