"""The schema is the single source of truth: fields stay as written, YAML only selects and
overrides, and a key the dataclasses do not have is an error in every form it can be written."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import MISSING, fields

import pytest
from omegaconf import OmegaConf

from moe_morpheus.config import (
    BudgetConfig,
    ConfigError,
    DataConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    SweepConfig,
    TrainerConfig,
    UpcycleConfig,
)
from moe_morpheus.config.experiment import CONF_DIR, ExperimentConfig, compose_experiment, to_experiment
from moe_morpheus.config.keys import (
    FOLDER_NAME_MAX_BYTES,
    check_keys,
    check_overrides,
    folder_name,
    schema_keys,
    unknown_key,
)
from moe_morpheus.config.moe import divisors_near

GROUPS = ["data", "experiment", "hydra", "model", "moe", "parallel", "sweeps", "trainer"]


@pytest.mark.parametrize("schema", [ModelConfig, MoEConfig, ParallelConfig, DataConfig, TrainerConfig,
                                    BudgetConfig, UpcycleConfig, SweepConfig, ExperimentConfig])
def test_building_a_config_keeps_every_field_as_written(schema):
    built = schema()
    for f in fields(schema):
        declared = f.default if f.default_factory is MISSING else f.default_factory()
        assert getattr(built, f.name) == declared, f.name


def test_ffn_hidden_size_stays_none_and_ffn_hidden_derives_it():
    tiny = ModelConfig(hidden_size=128)
    assert tiny.ffn_hidden_size is None and tiny.ffn_hidden == 384  # 8/3 x 128 = 341 -> 384
    assert ModelConfig(hidden_size=7200, num_attention_heads=72, ffn_hidden_size=19200).ffn_hidden == 19200
    # The registered schema is the dataclass as declared: the FFN follows each preset's width.
    assert compose_experiment(["model=glm_small"]).model.ffn_hidden_size is None
    assert compose_experiment(["model=glm_small"]).model.ffn_hidden == 704  # 8/3 x 256 = 683 -> 704
    with pytest.raises(ConfigError, match="model.ffn_hidden_size=0 must be positive"):
        ModelConfig(ffn_hidden_size=0)


def test_moe_or_none_and_vpp():
    dense, moe = compose_experiment(["+experiment=dense"]), compose_experiment(["+experiment=moe_8e"])
    assert dense.moe_or_none is None and moe.moe_or_none is moe.moe
    assert ParallelConfig().vpp == 1 and ParallelConfig(pp=2, virtual_pp=2).vpp == 2


def test_variant_stays_as_written_and_run_variant_derives_it(tmp_path):
    dense, moe = compose_experiment(["+experiment=dense"]), compose_experiment(["+experiment=moe_8e"])
    source = str(tmp_path / "dense" / "checkpoints")
    upcycled = compose_experiment(["+experiment=upcycle_64e", f"init.from_dense={source}"])
    assert (dense.variant, moe.variant, upcycled.variant) == (None, None, None)
    assert (dense.run_variant, moe.run_variant, upcycled.run_variant) == ("dense", "moe", "upcycled")
    assert compose_experiment(["+experiment=moe_8e", "variant=upcycled"]).run_variant == "upcycled"
    with pytest.raises(ConfigError, match="variant='sparse': choose dense, moe or upcycled"):
        compose_experiment(["+experiment=moe_8e", "variant=sparse"])


def test_divisors_near():
    assert divisors_near(384, 7) == [4, 6, 8]
    assert divisors_near(192, 192 / 100) == [1, 2, 3]
    with pytest.raises(ConfigError, match=r"moe.granularity=5 does not divide model.ffn_hidden_size=192: pick one "
                                          r"of its divisors near 5 \(3, 4, 6\)"):
        MoEConfig(layer_freq=2, granularity=5).expert_hidden(ModelConfig(hidden_size=64, ffn_hidden_size=192))


@pytest.mark.parametrize("key, message", [
    ("trainer.lerning_rate", "unknown config key trainer.lerning_rate: did you mean trainer.lr? (keys of trainer: "
                             "seed, global_batch_size,"),
    ("trainer.stepz", "did you mean trainer.steps?"),
    ("lr", "unknown config key lr: did you mean trainer.lr? (top-level keys: name, variant,"),
    ("seed", "did you mean data.seed, trainer.seed or upcycle.seed?"),
    ("data.sources.en.pth", "did you mean data.sources.en.path? (keys of data.sources.en: path, kind,"),
    ("foo", "unknown config key foo (top-level keys: name,"),
    ("trainer.lr.x", "unknown config key trainer.lr.x: trainer.lr is a value, it has no keys"),
])
def test_an_unknown_key_is_named_with_the_nearest_real_one(key, message):
    found = unknown_key(key, ExperimentConfig)
    assert message in found and "\n" not in found


def test_known_keys_pass_including_names_under_dict_fields():
    for key in ("trainer.lr", "moe.faster.group_size", "data.sources.mine.path", "guards.egs_schedule.1000"):
        assert unknown_key(key, ExperimentConfig) is None, key
    assert "data.sources.<name>.path" in schema_keys(ExperimentConfig)
    check_keys({"trainer": {"lr": 1.0}, "data": {"sources": {"mine": {"path": "x.txt"}}}}, ExperimentConfig)
    with pytest.raises(ConfigError, match="unknown config key trainer.lerning_rate"):
        check_keys({"trainer": {"lerning_rate": 1.0}}, ExperimentConfig)


def test_overrides_are_checked_with_or_without_plus_and_groups_pass():
    check_overrides(["+experiment=dense", "model=glm_1b", "+sweeps=dense_vs_moe", "hydra/launcher=slurm",
                     "trainer@_global_.trainer=cluster", "hydra.run.dir=out", "trainer.lr=1", "~trainer.lr",
                     "++trainer.lr=2", "data=demo"], ExperimentConfig, GROUPS)
    for override in ("trainer.lerning_rate=1", "+trainer.lerning_rate=1", "++trainer.lerning_rate=1",
                     "~trainer.lerning_rate"):
        with pytest.raises(ConfigError, match=r"^unknown config key trainer.lerning_rate: did you mean trainer.lr\?"):
            check_overrides([override], ExperimentConfig, GROUPS)


@pytest.mark.parametrize("override", ["trainer.lerning_rate=1", "+trainer.lerning_rate=1"])
def test_compose_experiment_rejects_an_unknown_key_in_either_form(override):
    with pytest.raises(ConfigError, match=r"^unknown config key trainer.lerning_rate: did you mean trainer.lr\?"):
        compose_experiment(["+experiment=dense", override])
    with pytest.raises(ConfigError, match=r"^unknown config key foo "):
        compose_experiment(["+foo=1"])


def test_a_key_added_to_a_composed_config_fails_when_it_is_built():
    # A sweep parameter written `+trainer.stepz: 1,2` is added by Hydra's sweeper, not on the command
    # line; Hydra adds a `+` key as this does.
    cfg = OmegaConf.structured(ExperimentConfig)
    OmegaConf.update(cfg, "trainer.stepz", 5, force_add=True)
    with pytest.raises(ConfigError, match=r"unknown config key trainer.stepz: did you mean trainer.steps\?"):
        to_experiment(cfg)


def test_train_py_stops_on_an_unknown_key_before_hydra_starts(tmp_path):
    result = subprocess.run([sys.executable, str(CONF_DIR.parent / "train.py"), "+trainer.lerning_rate=1"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: unknown config key trainer.lerning_rate: did you mean trainer.lr? (keys of trainer: "
        + ", ".join(f.name for f in fields(TrainerConfig)) + ")"]
    assert not (tmp_path / "outputs").exists()


def _defaults(schema: type) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(schema))


def _repeats(values: dict, defaults: dict, prefix: str = "") -> list[str]:
    """Keys of ``values`` whose value equals the default (sections compared key by key)."""
    found = []
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict):
            found += _repeats(value, defaults[key], f"{prefix}{key}.")
        elif key in defaults and value == defaults[key]:
            found.append(f"{prefix}{key}")
    return found


@pytest.mark.parametrize("group, schema", [("data", DataConfig), ("moe", MoEConfig), ("parallel", ParallelConfig)])
def test_group_files_only_override(group, schema):
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        values = OmegaConf.to_container(OmegaConf.load(path)) or {}
        assert _repeats(values, _defaults(schema)) == [], path.name


def test_model_presets_name_every_dimension_of_their_shape():
    # A changed ModelConfig default must not change a named model (docs/design.md#configuration).
    shape = {"num_layers", "hidden_size", "num_attention_heads", "vocab_size", "seq_length"}
    for path in sorted((CONF_DIR / "model").glob("*.yaml")):
        assert shape <= set(OmegaConf.to_container(OmegaConf.load(path))), path.name


def test_root_config_sets_no_schema_value():
    root = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"))
    assert set(root) == {"defaults", "hydra"}


def test_sweeps_are_a_config_group_sharing_one_callback(tmp_path):
    from hydra import compose, initialize_config_dir

    from moe_morpheus.config.experiment import register_configs

    register_configs()
    sweeps = sorted(p.stem for p in (CONF_DIR / "sweeps").glob("*.yaml"))
    assert {"chinchilla_ladder", "dense_vs_moe", "study_moe_vs_dense"} <= set(sweeps)
    for name in sweeps:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"+sweeps={name}"], return_hydra_config=True)
        callback = cfg.hydra.callbacks.mlflow_sweep
        assert callback._target_ == "moe_morpheus.tracking.sweep_callback.MLflowSweepCallback"
        assert callback.name == name and cfg.hydra.sweeper.params
        # One folder per sweep: rerunning the command resumes it.
        assert cfg.hydra.sweep.dir == f"multirun/{name}"
    # From any working directory: the group lives under conf/, no search path is added.
    result = subprocess.run([sys.executable, str(CONF_DIR.parent / "train.py"), "+sweeps=dense_vs_moe",
                             "--cfg", "hydra"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "MLflowSweepCallback" in result.stdout and "+experiment: dense,moe_8e" in result.stdout


def test_scaling_ladder_points_are_what_their_names_say():
    points = sorted(p.stem for p in (CONF_DIR / "ladder").glob("*.yaml"))
    assert len(points) == 9
    for point in points:
        width, tokens = (int(v) for v in point.lstrip("h").split("_r"))
        for experiment in ("dense", "moe_8e", "moe_64e"):  # the point wins over the experiment's own budget
            exp = compose_experiment(["+sweeps=scaling_ladder", f"+experiment={experiment}", f"+ladder={point}"])
            assert exp.model.hidden_size == width and exp.model.vocab_size == 2048 and exp.model.num_layers == 4
            assert exp.budget.chinchilla_fraction * exp.budget.tokens_per_param == pytest.approx(tokens)
            assert exp.data.tokenizer.endswith("demo_2k.model")


def test_job_folder_names_fit_a_file_system_and_stay_apart():
    short = "+experiment=moe_8e,trainer.seed=1"
    assert folder_name(short) == short  # as Hydra names it, when it fits
    assert folder_name("data.sources.en.path=/d/en.jsonl") == "data.sources.en.path=%2Fd%2Fen.jsonl"
    long_a, long_b = ("x" * 300 + ",trainer.seed=1"), ("x" * 300 + ",trainer.seed=2")
    a, b = folder_name(long_a), folder_name(long_b)
    assert a != b and len(a.encode()) == FOLDER_NAME_MAX_BYTES and a.startswith("x" * 150)
    assert folder_name(long_a) == a  # the same on every launch: a rerun finds the job again
    assert len(folder_name("数" * 100).encode()) <= FOLDER_NAME_MAX_BYTES  # never cut inside a character


def _flat(cfg, prefix=""):
    out = {}
    for key, value in (cfg.items() if isinstance(cfg, dict) else []):
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_ablation_variants_change_what_their_names_say():
    # Each variant of conf/sweeps/study_moe_ablation.yaml differs from its base arm in exactly
    # the keys it is named for (plus its name): a variant that silently changed more would
    # confound the ablation.
    expected = {
        "dense": ("dense", {}), "moe_8e": ("moe_8e", {}),
        "dense_lr_x2": ("dense", {"trainer.lr": 0.006}),
        "moe_8e_lr_half": ("moe_8e", {"trainer.lr": 0.0015}),
        "moe_8e_lr_x2": ("moe_8e", {"trainer.lr": 0.006}),
        "moe_8e_aux_0": ("moe_8e", {"moe.aux_loss_coeff": 0.0}),
        "moe_8e_aux_x10": ("moe_8e", {"moe.aux_loss_coeff": 0.1}),
        "moe_8e_top1_full": ("moe_8e", {"moe.top_k": 1, "moe.granularity": 1}),
        "moe_1e": ("moe_8e", {"moe.num_experts": 1, "moe.top_k": 1, "moe.granularity": 1}),
    }
    variants = sorted(p.stem for p in (CONF_DIR / "ablation").glob("*.yaml"))
    assert variants == sorted(expected)
    sweep = OmegaConf.load(CONF_DIR / "sweeps" / "study_moe_ablation.yaml").hydra.sweeper.params
    assert sorted(sweep["+ablation"].split(",")) == variants
    for variant, (base, changes) in expected.items():
        arm = _flat(OmegaConf.to_container(OmegaConf.structured(compose_experiment([f"+ablation={variant}"]))))
        ref = _flat(OmegaConf.to_container(OmegaConf.structured(compose_experiment([f"+experiment={base}"]))))
        differ = {k: arm[k] for k in arm if arm[k] != ref.get(k) and k != "name"}
        assert differ == changes, variant
        assert arm["name"] == variant
