"""A run's trainer.seed drives all of its randomness: initialisation, the training data (blend,
order, objectives, spans) and the upcycling draws (router rows, dropped units), unless data.seed
or upcycle.seed pins one; the validation sets are the same for every seed. Resolved in one place,
ExperimentConfig.seeds (the logged params are checked end to end in tests/train/test_app.py)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from moe_morpheus.config import ModelConfig, MoEConfig, TrainerConfig, UpcycleConfig, UpcycleError
from moe_morpheus.config.experiment import ExperimentConfig, Seeds, compose_experiment
from moe_morpheus.data.dataset import DataError, build_data
from moe_morpheus.upcycle.convert import upcycle_ffn
from tests.helpers.data import DATA_SEQ_LENGTH
from tests.helpers.presets import TINY_GLM

TRAIN_ROWS = range(0, 40, 3)


def test_trainer_seed_drives_every_seed_unless_pinned():
    follows = ExperimentConfig(trainer=TrainerConfig(seed=3))
    assert follows.seeds == Seeds(trainer=3, data=3, upcycle=3)
    assert (follows.data_config().seed, follows.upcycle_config().seed) == (3, 3)
    assert (follows.data.seed, follows.upcycle.seed) == (None, None)  # the config itself is not rewritten
    pinned = replace(follows, data=replace(follows.data, seed=11), upcycle=UpcycleConfig(seed=12))
    assert pinned.seeds == Seeds(trainer=3, data=11, upcycle=12)
    assert pinned.seeds.params() == {"trainer.seed": "3", "data.seed": "11", "upcycle.seed": "12"}


def test_sweeps_vary_all_seeds_through_trainer_seed(tmp_path):
    """The shipped configs leave data.seed / upcycle.seed null, and the staged upcycling sweep
    passes only trainer.seed: a seed of any sweep changes all three."""
    from moe_morpheus.upcycle.sweep import load_config, plan

    for experiment in ("dense", "moe_8e", "upcycle_64e"):
        assert compose_experiment([f"+experiment={experiment}", "trainer.seed=3"]).seeds == Seeds(3, 3, 3)
    stages = plan(load_config([f"output_dir={tmp_path}", "seeds=[3]", "extra_fractions=[0.006]"]))
    for stage in stages:
        assert not [a for a in stage.args if a.startswith(("data.seed", "upcycle.seed"))], stage.key
        overrides = [a for a in stage.args if not a.startswith("hydra.")]
        assert compose_experiment(overrides).seeds == Seeds(3, 3, 3), stage.key


def _rows(rows: list[dict]) -> list[np.ndarray]:
    return [np.concatenate([row[k].astype(np.float64).ravel() for k in sorted(row)]) for row in rows]


def _same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_data_follows_trainer_seed_and_validation_does_not(demo_data_cfg):
    def data(trainer_seed: int, data_seed: int | None = None):
        exp = ExperimentConfig(trainer=TrainerConfig(seed=trainer_seed),
                               data=replace(demo_data_cfg, seed=data_seed, valid_rows=8))
        built = build_data(exp.data_config(), DATA_SEQ_LENGTH, progress=False)
        return (_rows([built.train[i] for i in TRAIN_ROWS]), {k: _rows(v.rows) for k, v in built.valid.items()},
                built.unigram_entropy)

    one, two, pinned = data(1), data(2), data(2, data_seed=1)
    assert not _same(one[0], two[0])  # only trainer.seed differs: another training stream
    assert _same(one[0], pinned[0])  # data.seed pinned to 1: trainer seed 2 reads seed 1's stream
    for other in (two, pinned):
        assert set(other[1]) == set(one[1]) and one[1]
        for name, rows in one[1].items():
            assert rows and _same(rows, other[1][name]), name
        assert other[2] == one[2]  # the unigram baseline too


def test_upcycling_draws_follow_trainer_seed_unless_pinned():
    model, moe = ModelConfig(**TINY_GLM), MoEConfig(layer_freq=1, num_experts=4, top_k=2)
    gen = torch.Generator().manual_seed(0)
    ffn, hidden = model.ffn_hidden, model.hidden_size
    dense = {"value.weight": torch.randn(ffn, hidden, generator=gen), "value.bias": torch.randn(ffn, generator=gen),
             "gate_proj.weight": torch.randn(ffn, hidden, generator=gen), "gate_proj.bias": torch.randn(ffn, generator=gen),
             "fc2.weight": torch.randn(hidden, ffn, generator=gen), "fc2.bias": torch.randn(hidden, generator=gen)}

    def converted(trainer_seed: int, upcycle_seed: int | None = None):
        exp = ExperimentConfig(model=model, moe=moe, trainer=TrainerConfig(seed=trainer_seed),
                               upcycle=UpcycleConfig(mode="drop", seed=upcycle_seed))
        return upcycle_ffn(dense, model, moe, exp.upcycle_config(), layer=1)

    one, two, pinned = converted(1), converted(2), converted(2, upcycle_seed=1)
    for name in ("moe.gate.gate.weight", "moe.experts.w_value_EFD", "moe.experts.b_value_EF"):
        assert not torch.equal(one[name], two[name]), name  # router rows and dropped units redrawn
    assert all(torch.equal(one[name], pinned[name]) for name in one)


def test_unresolved_seeds_fail_with_the_fix(demo_data_cfg):
    with pytest.raises(DataError, match="data.seed is None .*ExperimentConfig.data_config"):
        build_data(replace(demo_data_cfg, seed=None), DATA_SEQ_LENGTH, progress=False)
    model, moe = ModelConfig(**TINY_GLM), MoEConfig(layer_freq=1, num_experts=4, top_k=2)
    with pytest.raises(UpcycleError, match="upcycle.seed is None .*ExperimentConfig.upcycle_config"):
        upcycle_ffn({}, model, moe, UpcycleConfig(mode="copy"), layer=0)
