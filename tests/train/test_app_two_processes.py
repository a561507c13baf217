"""End to end through the CLI: ``launch.nproc_per_node=2`` makes ``train.py`` start torchrun for the
job, with expert, tensor or pipeline parallelism; one run folder and one MLflow run per job."""

from __future__ import annotations

import pytest

from tests.helpers.train_app import SMALL, runs, train

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("layout,experiment,expected", [
    (["parallel.ep=2"], "moe_8e", "tp1-pp1-ep2-dp2"),
    (["parallel.tp=2"], "dense", "tp2-pp1-ep1-dp1"),
    (["parallel.pp=2"], "dense", "tp1-pp2-ep1-dp1"),
], ids=["ep2", "tp2", "pp2"])
def test_two_process_runs(tmp_path, layout, experiment, expected):
    """`launch.nproc_per_node=2` starts torchrun for the job; one run folder, one MLflow run."""
    train(tmp_path, f"+experiment={experiment}", "trainer.steps=2", "launch.nproc_per_node=2", *layout, *SMALL)
    frame = runs(tmp_path)
    assert len(frame) == 1 and frame["tags.parallel_layout"].iloc[0] == expected
    assert frame["status"].iloc[0] == "FINISHED"
    assert len(list((tmp_path / "outputs" / experiment).iterdir())) == 1
