"""Upcycling end to end through the commands, on one staged ``upcycle_vs_scratch`` sweep (one seed,
one extra fraction, one step per stage): the driver runs its five stages once (a second invocation
skips the finished ones); its upcycled stage (``init.from_dense``: convert and train in one go) and
a run resumed from ``python -m moe_morpheus.upcycle``'s conversion of the sweep's dense
checkpoint (``checkpoint.resume``) both carry the dense run's lineage in MLflow and start at its
validation loss."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.helpers.numerics import relative_error
from tests.helpers.train_app import SMALL, runs, train

pytestmark = pytest.mark.slow
FAST = [*SMALL, "trainer.eval_task_items=0", "trainer.eval_interval=0"]
# hidden 64: dense FFN 192; 8 experts of 96 = granularity 2, 4 groups, top-2.
TARGET = ["+experiment=upcycle_64e", "moe.num_experts=8"]


SWEEP = "upcycle_vs_scratch"
DRIVER_ARGS = ["seeds=[1]", "extra_fractions=[0.006]", "stage_steps=1",
               "overrides=[" + ",".join([*FAST, "moe.num_experts=8"]) + "]"]


def _client(tmp_path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")


def _run(tmp_path, name):
    frame = runs(tmp_path)
    return _client(tmp_path).get_run(frame[frame["tags.mlflow.runName"] == name].run_id.iloc[0])


def _drive(tmp_path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "moe_morpheus.upcycle.sweep", *DRIVER_ARGS, f"output_dir={tmp_path}/sweep",
               f"tracking_uri=sqlite:///{tmp_path}/mlflow.db"]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """The folder of one driver invocation: its MLflow store and the sweep's stage folders."""
    tmp_path = tmp_path_factory.mktemp("sweep")
    first = _drive(tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp_path


def test_driver_runs_stages_once(sweep):
    summary = json.loads((sweep / "sweep" / "summary.json").read_text())
    assert summary["ran"] == ["s1/dense", "s1/x0.006/dense_continued", "s1/x0.006/upcycled",
                              "s1/x0.006/scratch_extra", "s1/x0.006/scratch_total"]
    row = summary["extra"]["0.006"]
    assert row["upcycled"]["flops_with_sunk"] > row["upcycled"]["flops"]
    frame = runs(sweep)
    parents = frame[frame["tags.sweep_driver"] == "upcycle_sweep"]
    assert len(parents) == 1 and parents.status.iloc[0] == "FINISHED"
    children = frame[frame["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]]
    assert len(children) == 5 and set(children.status) == {"FINISHED"}
    by_name = dict(zip(children["tags.mlflow.runName"], children["tags.variant"]))
    assert by_name[f"{SWEEP}/s1/x0.006/upcycled"] == "upcycled"
    assert by_name[f"{SWEEP}/s1/x0.006/dense_continued"] == "dense"
    # The driver tags each stage's role and extra budget (the report labels arms by them).
    roles = dict(zip(children["tags.mlflow.runName"], zip(children["tags.sweep_role"], children["tags.sweep_extra"])))
    assert roles[f"{SWEEP}/s1/x0.006/scratch_total"] == ("scratch_total", "0.006")
    assert roles[f"{SWEEP}/s1/dense"][0] == "dense"
    # One seed: the summary shows the difference but gives no verdict.
    assert all(v.startswith("no verdict (n<3)") for v in row["equal_total"]["verdicts"])
    second = _drive(sweep)
    assert second.returncode == 0, second.stderr[-3000:]
    assert json.loads((sweep / "sweep" / "summary.json").read_text())["ran"] == []
    assert len(runs(sweep)) == 6  # nothing new: the same parent, the same five stages


def test_convert_then_train_and_init_from_dense_with_lineage(sweep, tmp_path):
    dense = _run(sweep, f"{SWEEP}/s1/dense")
    dense_checkpoints = sweep / "sweep" / "s1" / "dense" / "checkpoints"
    convert = subprocess.run([sys.executable, "-m", "moe_morpheus.upcycle", f"init.from_dense={dense_checkpoints}",
                              "convert.out=upcycled", *TARGET, *FAST], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert convert.returncode == 0, convert.stderr[-3000:]
    manifest = json.loads((tmp_path / "upcycled" / "step_00000000" / "checkpoint.json").read_text())
    assert manifest["model_shape"]["moe.num_experts"] == 8
    train(tmp_path, *TARGET, "trainer.steps=1", "tracking.run_name=from_converted",
          "checkpoint.resume=upcycled/step_00000000", *FAST)
    # The sweep's upcycled stage is the one-go path: init.from_dense converts and trains.
    for run, client in ((_run(tmp_path, "from_converted"), _client(tmp_path)),
                        (_run(sweep, f"{SWEEP}/s1/x0.006/upcycled"), _client(sweep))):
        assert run.info.status == "FINISHED"
        assert run.data.tags["variant"] == "upcycled"
        assert run.data.tags["upcycled_from_run"] == dense.info.run_id
        assert run.data.tags["upcycled_from_checkpoint"].endswith("s1/dense/checkpoints/step_00000001")
        assert run.data.params["sunk.tokens"] == str(int(dense.data.metrics["tokens_seen"]))
        assert float(run.data.params["sunk.flops"]) == pytest.approx(dense.data.metrics["flops"])
        assert run.data.metrics["flops_with_sunk"] == pytest.approx(run.data.metrics["flops"]
                                                                    + dense.data.metrics["flops"])
        assert run.data.params["sunk.target_tokens"] == str(int(dense.data.metrics["target_tokens_seen"]))
        assert run.data.metrics["target_tokens_with_sunk"] == (run.data.metrics["target_tokens_seen"]
                                                               + dense.data.metrics["target_tokens_seen"])
        # Step 0 is evaluated before any update: virtual_group reproduces the dense model.
        history = client.get_metric_history(run.info.run_id, "valid/loss")
        first = [m.value for m in history if m.step == 0]
        assert relative_error(torch.tensor(first), torch.tensor([dense.data.metrics["final/valid_loss"]])) <= 1e-5
    missing = train(tmp_path, *TARGET, "trainer.steps=1", "init.from_dense=nowhere", *FAST, check=False)
    assert missing.returncode == 2 and "nowhere does not exist: pass a run's checkpoints folder" in missing.stderr


def test_a_stage_whose_dense_checkpoint_is_elsewhere_stops_with_the_fix(sweep, tmp_path):
    """The store carried to another folder (a fresh clone): the dense stage is FINISHED there, its
    checkpoint is not, so an unfinished stage that starts from it stops with one line, and the
    store keeps its runs as they were."""
    shutil.copy(sweep / "mlflow.db", tmp_path / "mlflow.db")
    continued = _run(tmp_path, f"{SWEEP}/s1/x0.006/dense_continued")
    _client(tmp_path).set_terminated(continued.info.run_id, status="KILLED")
    result = _drive(tmp_path)
    assert result.returncode == 2, result.stderr[-3000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: stage s1/x0.006/dense_continued starts from the dense checkpoint")
    assert "rerun every stage under a new name=" in error
    assert _client(tmp_path).get_run(continued.info.run_id).info.status == "KILLED"
    frame = runs(tmp_path)
    assert len(frame) == 7  # the sweep's 6 and a parent for the new folder, FAILED; no stage ran
    assert frame[frame["tags.sweep_dir"] == str(tmp_path / "sweep")].status.tolist() == ["FAILED"]
