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
    # At the end of a run, how long to wait for an absent server before leaving the undelivered
    # records in <run folder>/mlflow/spool.jsonl (then: python -m moe_morpheus.tracking sync). A
    # server restart takes ~10-40 s (mlflow server on 2 busy cores: 37 s with 4 workers), so 60 s
    # rides one out while a dead server costs a finished run one minute.
    finish_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        check(self.finish_timeout_s >= 0, f"tracking.finish_timeout_s={self.finish_timeout_s} must be >= 0 "
                                          "(0: do not wait)")


@dataclass
class LaunchConfig:
    """How a job starts its processes when not already under torchrun or Slurm."""

    # > 1: the job runs itself as `torchrun --nproc_per_node=N train.py ...` (sweep jobs too).
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        check(self.nproc_per_node >= 1, f"launch.nproc_per_node={self.nproc_per_node} must be >= 1")
