"""End to end through the CLI, two processes with EP=2: exact resume after SIGKILL, Ctrl-C (SIGINT to
``train.py``, which runs torchrun) saves and the command it prints resumes exactly, and an elastic
restart under ``torchrun --max-restarts=1`` after a rank crashes. Losses are compared bit for bit,
read back from MLflow."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers.resume import (
    EP2,
    RUN,
    assert_same_losses,
    env,
    metric,
    run_printed_command,
    train,
    train_and_kill,
    train_and_signal,
)
from tests.helpers.train_app import REPO

pytestmark = pytest.mark.slow


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


def test_sigkill_then_resume_is_exact_with_two_processes_and_ep2(tmp_path, reference_ep2):
    train_and_kill(tmp_path, tmp_path / "run", *EP2)
    train(tmp_path, tmp_path / "run", *EP2)
    assert_same_losses(reference_ep2, metric(tmp_path, "train/loss"))


def test_ctrl_c_with_two_processes_saves_and_the_printed_command_resumes_exactly(tmp_path, reference_ep2):
    run_dir = tmp_path / "run"
    stopped = train_and_signal(tmp_path, run_dir, signal.SIGINT, *EP2)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stdout, stopped.stdout[-3000:]
    # Both ranks saved the same step, and the printed command resumes it.
    run_printed_command(tmp_path, run_dir, stopped)
    losses = metric(tmp_path, "train/loss")
    assert sorted(losses) == list(range(1, 21))
    assert all(v == reference_ep2[s][0] for s, values in losses.items() for v in values), (losses, reference_ep2)


def test_a_crashed_rank_under_torchrun_max_restarts_resumes_and_finishes(tmp_path, reference_ep2):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max-restarts=1", str(REPO / "train.py"), f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *RUN,
               "parallel.ep=2", "faults.crash_step=13", "faults.crash_rank=1"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, env=env(), timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert "rank 1 crashes before step 13" in result.stdout + result.stderr
    runs = list((tmp_path / "outputs" / "moe_8e").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("torchrun-")  # the restart found its folder again
    assert "resumed from" in result.stdout
    assert_same_losses(reference_ep2, metric(tmp_path, "train/loss"))
