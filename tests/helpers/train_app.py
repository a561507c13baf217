"""``train.py`` as a subprocess in a temporary folder with its own MLflow database, and the small
overrides the end-to-end tests share."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow

REPO = Path(__file__).resolve().parents[2]
# A few steps of a small model: the mechanics, not the quality.
SMALL = [
    "model.num_layers=2", "model.hidden_size=64", "model.seq_length=64", "trainer.global_batch_size=4",
    "trainer.micro_batch_size=2", "data.valid_rows=4", "trainer.progress=false",
]


def train(tmp_path: Path, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    # A clean launch environment: no rendezvous variables from this process's own process group.
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    full_env.update(PYTHONWARNINGS="ignore::UserWarning", OMP_NUM_THREADS="1", **(env or {}))
    result = subprocess.run(
        [sys.executable, str(REPO / "train.py"), *args,
         *([] if any(a.startswith("tracking.uri=") for a in args) else [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])],
        cwd=tmp_path, capture_output=True, text=True, env=full_env, timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"train.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def runs(tmp_path: Path):
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    return mlflow.search_runs(experiment_names=["moe_morpheus"])
