"""End to end through the CLI, one process: exact resume after SIGKILL, SIGTERM saves and the command
it prints resumes exactly, a kill during a save, and injected NaN and loss spike with rollback. Losses are compared bit for bit, read back from MLflow.
(Two processes: test_checkpoint_resume_two_processes.py.)"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import replace

import pytest
import torch

from moe_morpheus.data.dataset import build_data
from tests.helpers.resume import (
    assert_same_losses,
    command,
    env,
    metric,
    printed_argv,
    run_printed_command,
    run_status,
    train,
    train_and_kill,
    train_and_signal,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    train(tmp, tmp / "run")
    return metric(tmp, "train/loss")


def test_sigkill_then_resume_is_exact(tmp_path, reference):
    train_and_kill(tmp_path, tmp_path / "run")
    resumed = train(tmp_path, tmp_path / "run")
    assert "resumed from" in resumed.stdout
    assert_same_losses(reference, metric(tmp_path, "train/loss"))


def test_sigterm_saves_and_the_printed_command_resumes_exactly(tmp_path, reference):
    run_dir = tmp_path / "run"
    stopped = train_and_signal(tmp_path, run_dir, signal.SIGTERM)
    assert stopped.returncode == 143 and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    step, line, resumed = run_printed_command(tmp_path, run_dir, stopped)
    assert f"saved {run_dir / 'checkpoints' / f'step_{step:08d}'}" in line
    assert f"resumed from {run_dir / 'checkpoints' / f'step_{step:08d}'}" in resumed.stdout
    losses = metric(tmp_path, "train/loss")  # the same MLflow run, FINISHED
    assert sorted(losses) == list(range(1, 21))
    assert all(v == reference[s][0] for s, values in losses.items() for v in values), (losses, reference)
    # train.log holds both processes' story: the start, the steps, the interruption, the resume, the end.
    log = (run_dir / "train.log").read_text()
    for text in ("run started", "step 5/20 loss", "interrupted (SIGTERM)", "resumed from", "step 20/20 loss",
                 "evaluation (full sets)", "finished: step 20 of 20"):
        assert text in log, text

    # Resuming a finished run: nothing evaluated, nothing logged, exit 0.
    again = subprocess.run(printed_argv(line), cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0 and "already finished (step 20 of 20" in again.stdout
    assert "tokens/s" not in again.stdout and run_status(tmp_path) == "FINISHED"
    assert len(metric(tmp_path, "valid/loss")[20]) == 1


def test_a_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, reference):
    run_dir = tmp_path / "run"
    killed = subprocess.run(command(tmp_path, run_dir, "faults.crash_in_save_step=15"), cwd=tmp_path,
                            capture_output=True, text=True, env=env(), timeout=600)
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
