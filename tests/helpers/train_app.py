"""``train.py`` as a subprocess in a temporary folder with its own MLflow database, and the small
overrides the end-to-end tests share."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[2]
# A few steps of a small model: the mechanics, not the quality.
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.seq_length=64", "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2", "data.valid_rows=4", "trainer.progress=false",
]


def train_env(env: dict | None = None) -> dict:
    """A clean launch environment: no rendezvous variables from this process's own process group."""
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update(PYTHONWARNINGS="ignore::UserWarning", OMP_NUM_THREADS="1", **(env or {}))
    return full_env


def train_command(tmp_path: Path, *args: str) -> list[str]:
    """``train.py ARGS`` logging to ``tmp_path``'s own MLflow database unless ARGS name a URI."""
    return [sys.executable, str(REPO / "train.py"), *args,
            *([] if any(a.startswith("tracking.uri=") for a in args) else [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])]


def train(tmp_path: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(tmp_path, *args), cwd=tmp_path, capture_output=True, text=True,
                            env=train_env(env), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout_s: float = 300) -> None:
    """Poll ``condition()`` until it is true while ``proc`` (writing to ``log``) still runs."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert proc.poll() is None, f"the process ended first:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"not within {timeout_s} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


def runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["moe_morpheus"])
