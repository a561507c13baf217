"""MLflow tracking and how a job launches its processes."""

from __future__ import annotations

from dataclasses import dataclass

from moe_morpheus.config.errors import check


@dataclass
class TrackingConfig:
    """MLflow. ``uri`` None: ``sqlite:///mlflow.db`` in the launch directory (MLflow's default)."""

    uri: str | None = None
    experiment: str = "moe_morpheus"
    run_name: str | None = None
    # Fail at start when the tracking server cannot be reached (default: warn, spool locally).
    strict: bool = False


@dataclass
class LaunchConfig:
    """How a job starts its processes when not already under torchrun or Slurm."""

    # > 1: the job runs itself as `torchrun --nproc_per_node=N train.py ...` (sweep jobs too).
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        check(self.nproc_per_node >= 1, f"launch.nproc_per_node={self.nproc_per_node} must be >= 1")
