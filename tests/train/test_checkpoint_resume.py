"""End to end through the CLI: exact resume after SIGKILL (1 process, and 2 processes with EP=2),
a kill during a save, injected NaN and loss spike with rollback, and an elastic restart under
``torchrun --max-restarts=1``. Losses are compared bit for bit, read back from MLflow."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import psutil
import pytest
import torch
from mlflow.tracking import MlflowClient

from moe_morpheus.data.dataset import build_data
from tests.helpers.train_app import REPO, SMALL

pytestmark = pytest.mark.slow

# 20 steps, a checkpoint every 5; evaluation only at the end (the losses under test are training's).
RUN = ["+experiment=moe_8e", "trainer.steps=20", "checkpoint.interval_steps=5", "trainer.eval_interval=0", *SMALL]
EP2 = ["launch.nproc_per_node=2", "parallel.ep=2"]


def _env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore::UserWarning", OMP_NUM_THREADS="1")


def _command(tmp: Path, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"hydra.run.dir={run_dir}", *RUN, *args]


def train(tmp: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(_command(tmp, run_dir, *args), cwd=tmp, capture_output=True, text=True, env=_env(),
                            timeout=600)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train_and_kill(tmp: Path, run_dir: Path, *args: str) -> float:
    """Start a run, SIGKILL it and all its processes at a random moment after step 10's
    checkpoint is complete; returns the delay (printed, to reproduce a failure)."""
    log = (tmp / "killed.log").open("w")
    proc = subprocess.Popen(_command(tmp, run_dir, *args), cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                            env=_env())
    marker = run_dir / "checkpoints" / "step_00000010" / "checkpoint.json"
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None, f"the run ended before step 10's checkpoint:\n{(tmp / 'killed.log').read_text()}"
        assert time.monotonic() < deadline, "no checkpoint of step 10 within 300 s"
        time.sleep(0.02)
    delay = random.uniform(0.0, 0.3)
    print(f"SIGKILL {delay:.3f} s after step 10's checkpoint")
    time.sleep(delay)
    family = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)]
    for process in family:  # the whole job dies at once, as when a node fails
        process.kill()
    proc.wait()
    assert proc.returncode == -9, "the run had already finished: it was not killed mid-run"
    return delay


def metric(tmp: Path, key: str) -> dict[int, list[float]]:
    """Every value logged for ``key`` by the only MLflow run, by step (a resumed run logs the
    steps after its checkpoint again)."""
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
    assert len(runs) == 1, "a resumed run must continue its MLflow run, not open another"
    assert runs[0].info.status == "FINISHED"
    values: dict[int, list[float]] = {}
    for m in client.get_metric_history(runs[0].info.run_id, key):
        values.setdefault(m.step, []).append(m.value)
    return values


def assert_same_losses(reference: dict, resumed: dict) -> None:
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert resumed[step] and all(v == reference[step][0] for v in resumed[step]), (step, resumed[step],
                                                                                       reference[step])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    train(tmp, tmp / "run")
    return metric(tmp, "train/loss")


@pytest.fixture(scope="module")
def reference_ep2(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference_ep2")
    result = train(tmp, tmp / "run", *EP2)
    # The expert load is summed over both ranks (each routes its own micro-batches): every
    # (token, slot) assignment of the 20 steps x 4 rows x 64 tokens x top-2 is counted once, and
    # both ranks save the same trainer state, so Megatron's check of rank 1's common state
    # against rank 0's (at each of the 4 saves) stays silent.
    final = torch.load(tmp / "run" / "checkpoints" / "step_00000020" / "common.pt", weights_only=True)
    assert {layer: sum(load) for layer, load in final["trainer"]["moe_load"].items()} == {"layer2": 20 * 4 * 64 * 2}
    assert "common state dict differs" not in result.stdout + result.stderr
    return metric(tmp, "train/loss")


def test_sigkill_then_resume_is_exact(tmp_path, reference):
    train_and_kill(tmp_path, tmp_path / "run")
    resumed = train(tmp_path, tmp_path / "run")
    assert "resumed from" in resumed.stdout
    assert_same_losses(reference, metric(tmp_path, "train/loss"))


def test_sigkill_then_resume_is_exact_with_two_processes_and_ep2(tmp_path, reference_ep2):
    train_and_kill(tmp_path, tmp_path / "run", *EP2)
    train(tmp_path, tmp_path / "run", *EP2)
    assert_same_losses(reference_ep2, metric(tmp_path, "train/loss"))


def test_a_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    killed = subprocess.run(_command(tmp_path, run_dir, "faults.crash_in_save_step=15"), cwd=tmp_path,
                            capture_output=True, text=True, env=_env(), timeout=600)
    assert killed.returncode == -9
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / ".tmp-step_00000015").is_dir() and not (checkpoints / "step_00000015").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_00000010"
    resumed = train(tmp_path, run_dir)
    assert f"resumed from {checkpoints / 'step_00000010'}" in resumed.stdout
    assert not (checkpoints / ".tmp-step_00000015").exists()
    assert_same_losses(reference, metric(tmp_path, "train/loss"))
    # keep=3 (the default): 10, 15 and 20 are left.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000010", "step_00000015",
                                                             "step_00000020"]


def test_injected_nan_skips_and_injected_spike_rolls_back(tmp_path, demo_data_cfg):
    run_dir = tmp_path / "run"
    result = train(tmp_path, run_dir, "faults.nan_step=4", "faults.spike_step=14", "guards.spike_window=5",
                   "guards.spike_action=rollback")
    output = result.stdout + result.stderr
    assert "loss spike at step 14" in output and "rolled back" in output
    skipped, rollbacks = metric(tmp_path, "guards/skipped"), metric(tmp_path, "guards/rollbacks")
    assert skipped[3] == [0] and skipped[4] == [1] and skipped[20] == [1]  # one NaN, one skipped update
    # Steps 11-14 are logged twice: before the rollback at step 14, and again after it.
    assert rollbacks[13][0] == 0 and rollbacks[14][0] == 1 and rollbacks[20] == [1]
    assert metric(tmp_path, "guards/spikes")[20][-1] == 1
    assert 4 not in metric(tmp_path, "train/loss")  # a NaN is not logged as a loss
    final = torch.load(run_dir / "checkpoints" / "step_00000020" / "common.pt", weights_only=True)
    # The checkpoint of step 10 had consumed 40 samples; the spike batch ended at 56.
    assert final["trainer"]["guards"]["skipped_ranges"] == [[40, 56]]
    assert final["trainer"]["consumed_samples"] == 20 * 4 + 16
    # Target tokens trained on: the checkpoint's rows [0, 40), then [56, 96) after the skipped range
    # (the NaN step's rows count: they were processed). The run's data seed is trainer.seed, 1234.
    data = build_data(replace(demo_data_cfg, seed=1234, valid_rows=4), 64, progress=False)
    kept = [*range(40), *range(56, 96)]
    assert final["trainer"]["target_tokens"] == sum(int(data.train[i]["loss_mask"].sum()) for i in kept)


def test_a_crashed_rank_under_torchrun_max_restarts_resumes_and_finishes(tmp_path, reference_ep2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", str(REPO / "train.py"), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *RUN,
               "parallel.ep=2", "faults.crash_step=13", "faults.crash_rank=1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "rank 1 crashes before step 13" in result.stdout + result.stderr
    runs = list((tmp_path / "outputs" / "moe_8e").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-")  # the restart found its folder again
    assert "resumed from" in result.stdout
    assert_same_losses(reference_ep2, metric(tmp_path, "train/loss"))
