"""The root configuration of a run, its cross-component checks, and its Hydra registration.

``conf/config.yaml`` starts from the ``experiment_schema`` registered here, so every YAML file and
every command-line override is checked against these dataclasses: a key they do not have fails at
composition, written with or without ``+``, with the key's name and the nearest real key
(:mod:`moe_morpheus.config.keys`); :func:`to_experiment` builds the validated objects.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from moe_morpheus.config.budget import BudgetConfig
from moe_morpheus.config.data import DataConfig, sources_left_to_configs
from moe_morpheus.config.errors import ConfigError
from moe_morpheus.config.keys import check_keys, check_overrides, folder_name
from moe_morpheus.config.model import ModelConfig
from moe_morpheus.config.moe import MoEConfig
from moe_morpheus.config.parallel import ParallelConfig
from moe_morpheus.config.tracking import LaunchConfig, TrackingConfig
from moe_morpheus.config.trainer import CheckpointConfig, FaultConfig, GuardConfig, TrainerConfig
from moe_morpheus.config.upcycle import InitConfig, UpcycleConfig, granularity


@dataclass(frozen=True)
class Seeds:
    """A run's effective seeds (:attr:`ExperimentConfig.seeds`)."""

    trainer: int  # model initialisation (and Megatron's RNG streams)
    data: int  # training stream: blend, data order, [MASK]/[gMASK] objectives and spans
    upcycle: int  # upcycling draws: router rows, Drop-Upcycling's re-initialised units

    def params(self) -> dict[str, str]:
        """The resolved seeds as MLflow params, under the config's own keys (a ``data.seed`` of
        None is logged as the seed it followed)."""
        return {"trainer.seed": str(self.trainer), "data.seed": str(self.data), "upcycle.seed": str(self.upcycle)}


@dataclass
class ExperimentConfig:
    # The experiment's name (conf/experiment/NAME.yaml sets it); names MLflow runs and outputs.
    name: str = "default"
    # dense / moe / upcycled; None: moe when any layer is MoE, else dense.
    variant: str | None = None
    # Set by sweep configs: tags the runs and names the MLflow parent run.
    sweep: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guards: GuardConfig = field(default_factory=GuardConfig)
    faults: FaultConfig = field(default_factory=FaultConfig)
    # init.from_dense: start from a dense checkpoint converted per `upcycle` (moe_morpheus/upcycle/convert.py).
    init: InitConfig = field(default_factory=InitConfig)
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)

    @property
    def run_variant(self) -> str:
        """The run's ``variant`` tag: ``variant`` when set, else derived from the model and its start."""
        if self.variant is not None:
            return self.variant
        upcycled = self.init.from_dense is not None and self.moe.enabled
        return "upcycled" if upcycled else "moe" if self.moe.enabled else "dense"

    def __post_init__(self) -> None:
        if self.variant not in (None, "dense", "moe", "upcycled"):
            raise ConfigError(f"variant={self.variant!r}: choose dense, moe or upcycled (or null)")
        self.parallel.validate_model(self.model)
        if self.moe.enabled:
            self.moe.expert_hidden(self.model)  # a granularity that does not divide the FFN fails here
        if self.init.from_dense is not None and self.moe.enabled:
            granularity(self.model, self.moe, self.upcycle)  # bad upcycling targets fail at composition
        if self.moe.enabled and self.moe.num_experts % self.parallel.ep:
            raise ConfigError(
                f"moe.num_experts={self.moe.num_experts} is not divisible by parallel.ep={self.parallel.ep}: "
                f"each expert-parallel rank must hold the same number of experts"
            )
        if not self.moe.enabled and self.parallel.ep > 1:
            raise ConfigError(f"parallel.ep={self.parallel.ep} needs MoE layers: set moe.layer_freq > 0 or ep=1")

    def validate_world(self, world_size: int) -> int:
        """Layout against the process count; returns the data-parallel size."""
        dp = self.parallel.validate_world(world_size)
        per_step = self.trainer.micro_batch_size * dp
        if self.trainer.global_batch_size % per_step:
            raise ConfigError(
                f"trainer.global_batch_size={self.trainer.global_batch_size} is not a multiple of "
                f"micro_batch_size x data-parallel size = {self.trainer.micro_batch_size} x {dp}"
            )
        return dp

    @property
    def seeds(self) -> Seeds:
        """The one place the seeds are resolved: ``trainer.seed`` drives initialisation, the
        training data and the upcycling draws, unless ``data.seed`` / ``upcycle.seed`` pin one
        (None: follow). So the seeds of one configuration differ in all of a run's randomness
        and their spread measures run-to-run variance; the validation sets do not depend on any
        of them (``data.valid_seed``, content-hash split)."""
        t = self.trainer.seed
        return Seeds(trainer=t, data=t if self.data.seed is None else self.data.seed,
                     upcycle=t if self.upcycle.seed is None else self.upcycle.seed)

    def data_config(self) -> DataConfig:
        """``data`` with its effective seed: what the data is built from."""
        return replace(self.data, seed=self.seeds.data)

    def upcycle_config(self) -> UpcycleConfig:
        """``upcycle`` with its effective seed: what a dense checkpoint is converted with."""
        return replace(self.upcycle, seed=self.seeds.upcycle)

    @property
    def layout(self) -> str:
        p = self.parallel
        return f"tp{p.tp}-pp{p.pp}" + (f"-vpp{p.vpp}" if p.vpp > 1 else "") + f"-ep{p.ep}"

    @property
    def moe_or_none(self) -> MoEConfig | None:
        """``moe`` when any layer is MoE, else None: what model building and counting take."""
        return self.moe if self.moe.enabled else None


def register_configs() -> None:
    """The schema for Hydra, and the ``folder_name`` resolver that names multirun job folders
    (conf/config.yaml)."""
    if not OmegaConf.has_resolver("folder_name"):
        OmegaConf.register_new_resolver("folder_name", folder_name)
    ConfigStore.instance().store(name="experiment_schema",
                                 node=sources_left_to_configs(OmegaConf.structured(ExperimentConfig)))


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Build (and so validate) the dataclasses from a composed Hydra config."""
    # `+section.key=value` (and a sweep parameter written so) adds a key the dataclass has not.
    check_keys(OmegaConf.to_container(cfg), ExperimentConfig)
    experiment = OmegaConf.to_object(cfg)
    assert isinstance(experiment, ExperimentConfig)
    return experiment


CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


def check_command_line(overrides: list[str]) -> None:
    """Raise ConfigError for an override whose key the schema has not, before Hydra composes
    (Hydra's own error for ``trainer.x=1`` suggests ``+trainer.x=1``, which it accepts)."""
    check_overrides(overrides, ExperimentConfig, groups=[p.name for p in CONF_DIR.iterdir() if p.is_dir()])


def compose_experiment(overrides: list[str]) -> ExperimentConfig:
    """The validated experiment that ``python train.py <overrides>`` would run (Hydra compose
    API), for commands that need the configuration but not a training run."""
    from hydra import compose, initialize_config_dir

    check_command_line(overrides)
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return to_experiment(cfg)
