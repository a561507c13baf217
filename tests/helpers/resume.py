"""Kill-and-resume runs of ``train.py`` for the checkpoint tests: a 20-step run with a checkpoint
every 5, a SIGKILL of the whole job at a random moment after step 10's checkpoint, and the losses
read back from MLflow for a bit-for-bit comparison."""

from __future__ import annotations

import os
import random
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
from mlflow.tracking import MlflowClient

from tests.helpers.train_app import REPO, SMALL, wait_for

# 20 steps, a checkpoint every 5; evaluation only at the end (the losses under test are training's).
RUN = ["+experiment=moe_8e", "trainer.steps=20", "checkpoint.interval_steps=5", "trainer.eval_interval=0", *SMALL]
EP2 = ["launch.nproc_per_node=2", "parallel.ep=2"]


def env() -> dict:
    return dict(os.environ, PYTHONWARNINGS="ignore::UserWarning", OMP_NUM_THREADS="1")


def command(tmp: Path, run_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), f"tracking.uri=sqlite:///{tmp}/mlflow.db",
            f"hydra.run.dir={run_dir}", *RUN, *args]


def train(tmp: Path, run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(command(tmp, run_dir, *args), cwd=tmp, capture_output=True, text=True, env=env(),
                            timeout=600)
    assert result.returncode == 0, f"train.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def start_until_checkpoint(tmp: Path, run_dir: Path, step: int, log, *args: str) -> subprocess.Popen:
    """Start a run writing to ``log`` and return once step ``step``'s checkpoint is complete."""
    proc = subprocess.Popen(command(tmp, run_dir, *args), cwd=tmp, stdout=log, stderr=subprocess.STDOUT, env=env())
    wait_for((run_dir / "checkpoints" / f"step_{step:08d}" / "checkpoint.json").exists, proc, Path(log.name))
    return proc


def train_and_kill(tmp: Path, run_dir: Path, *args: str) -> float:
    """Start a run, SIGKILL it and all its processes at a random moment after step 10's
    checkpoint is complete; returns the delay (printed, to reproduce a failure)."""
    log = (tmp / "killed.log").open("w")
    proc = start_until_checkpoint(tmp, run_dir, 10, log, *args)
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


def train_and_signal(tmp: Path, run_dir: Path, signum: int, *args: str) -> subprocess.CompletedProcess:
    """Start a run and send ``signum`` to the ``train.py`` process once step 5's checkpoint is
    complete, as a terminal's Ctrl-C, ``timeout`` or Slurm would; its output and exit code."""
    out = tmp / "signalled.log"
    with out.open("w") as log:
        proc = start_until_checkpoint(tmp, run_dir, 5, log, *args)
        os.kill(proc.pid, signum)
        proc.wait(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(), "")


def run_status(tmp: Path) -> str:
    client = MlflowClient(f"sqlite:///{tmp}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("moe_morpheus").experiment_id])
    return run.info.status


def resume_line(output: str) -> str:
    """The one line an interrupted run prints, with the command that resumes it."""
    lines = [line for line in output.splitlines() if "resume with: " in line]
    assert len(lines) == 1, output[-3000:]
    return lines[0]


def run_printed_command(tmp: Path, run_dir: Path, stopped: subprocess.CompletedProcess
                        ) -> tuple[int, str, subprocess.CompletedProcess]:
    """An interrupted run's saved step (checked: a complete checkpoint, at or after the signal at
    step 5, and the MLflow run KILLED), the line it printed, and the run of the command in it."""
    line = resume_line(stopped.stdout)
    step = int(line.split("after step ")[1].split(":")[0])
    # With several ranks, a complete checkpoint means every rank saved that step (its manifest lists them all).
    assert (run_dir / "checkpoints" / f"step_{step:08d}" / "checkpoint.json").is_file() and step >= 5
    assert run_status(tmp) == "KILLED"
    resumed = subprocess.run(printed_argv(line), cwd=tmp, capture_output=True, text=True, env=env(), timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    return step, line, resumed


def printed_argv(line: str) -> list[str]:
    return shlex.split(line.split("resume with: ")[1])
