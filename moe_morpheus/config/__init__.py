"""Configuration: one dataclass per component, the single source of every default.

Hydra YAML under ``conf/`` only selects and overrides these; every check lives in the dataclass
that owns the field, so a config that cannot work fails before any process group or model is
created, with a message that names the field and the fix. :class:`ExperimentConfig` is the root.
"""

from moe_morpheus.config.budget import BudgetConfig
from moe_morpheus.config.data import DataConfig, SourceConfig
from moe_morpheus.config.errors import ConfigError
from moe_morpheus.config.experiment import ExperimentConfig, Seeds, compose_experiment, to_experiment
from moe_morpheus.config.model import ModelConfig
from moe_morpheus.config.moe import FasterMoEConfig, MoEConfig
from moe_morpheus.config.parallel import ParallelConfig
from moe_morpheus.config.tracking import LaunchConfig, TrackingConfig
from moe_morpheus.config.trainer import CheckpointConfig, FaultConfig, GuardConfig, TrainerConfig
from moe_morpheus.config.upcycle import InitConfig, SweepConfig, UpcycleConfig, UpcycleError

__all__ = [
    "BudgetConfig", "CheckpointConfig", "ConfigError", "DataConfig", "ExperimentConfig", "FasterMoEConfig",
    "FaultConfig", "GuardConfig", "InitConfig", "LaunchConfig", "ModelConfig", "MoEConfig", "ParallelConfig",
    "Seeds", "SourceConfig", "SweepConfig", "TrackingConfig", "TrainerConfig", "UpcycleConfig", "UpcycleError",
    "compose_experiment", "to_experiment",
]
