"""Hydra multirun sweeps in MLflow: one parent run per sweep, every job a nested child.

Sweeps: :class:`MLflowSweepCallback` creates the parent run in ``on_multirun_start`` (also the
moment the SQLite database and the experiment are created, once, before any job could race on
them) and publishes its id in the file ``<hydra.sweep.dir>/mlflow_parent_run_id`` (read by jobs
in any process: basic launcher, joblib, submitit) and in the environment variable
``MOE_MORPHEUS_PARENT_RUN_ID`` (inherited by processes a job spawns, e.g. torchrun ranks). Jobs
get it with :func:`parent_run_id`. A later launch into the same sweep folder (the sweeps in
``conf/sweeps/`` name their folder after the sweep, so rerunning the command does) reopens that
parent instead of making a second one: the rerun resumes the same jobs in the same MLflow runs.
"""


from __future__ import annotations

import atexit
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.utils.validation import (
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig

from moe_morpheus.tracking.names import (
    PARENT_RUN_ENV,
    PARENT_RUN_FILE,
    PARENT_TAG,
    TrackingWarning,
    fit_value,
    git_commit,
    resolve_uri,
)
from moe_morpheus.tracking.store import ensure_experiment, job_folder, limit_http_retries

log = logging.getLogger(__name__)

def parent_run_id(sweep_dir: str | Path | None) -> str | None:
    """The sweep's parent run id for a job: the file in ``sweep_dir`` written by
    :class:`MLflowSweepCallback`, else ``MOE_MORPHEUS_PARENT_RUN_ID``, else None (not a sweep).
    The file wins because it belongs to this sweep; the variable reaches processes a job
    spawns without a sweep directory (torchrun ranks)."""
    if sweep_dir is not None:
        path = Path(sweep_dir) / PARENT_RUN_FILE
        if path.exists():
            return path.read_text().strip()
    return os.environ.get(PARENT_RUN_ENV) or None


def newest_per_folder(runs: list) -> list:
    """The newest MLflow run of each job folder (:func:`~moe_morpheus.tracking.store.job_folder`;
    runs without one stand alone). A job stopped before its first checkpoint, or whose
    checkpoints stayed on another machine, starts a new run when the sweep is rerun; the stopped
    one stays KILLED under the parent but is not the job's outcome."""
    newest: dict[str, Any] = {}
    for run in runs:
        key = job_folder(run) or run.info.run_id
        if key not in newest or run.info.start_time > newest[key].info.start_time:
            newest[key] = run
    return list(newest.values())


class MLflowSweepCallback(Callback):
    """Hydra callback: one parent MLflow run per multirun, every job a nested child.

    Configure in the sweep config::

        hydra:
          callbacks:
            mlflow_sweep:
              _target_: moe_morpheus.tracking.MLflowSweepCallback
              name: dense_vs_moe
              experiment: ${tracking.experiment}
              uri: ${tracking.uri}

    The parent ends FINISHED when no child FAILED or was KILLED, else FAILED. When a job raises,
    Hydra re-raises before ``on_multirun_end``; an exit handler then ends the parent FAILED
    rather than leaving it RUNNING forever.
    """

    def __init__(self, name: str, experiment: str, uri: str | None = None) -> None:
        self.name = name
        self.experiment = experiment
        self.uri = uri
        self.run_id: str | None = None
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        self.uri = resolve_uri(self.uri)
        limit_http_retries()
        tags = {"sweep": self.name, "sweep_dir": str(sweep_dir)}
        overrides = config.hydra.overrides.get("task")
        if overrides:
            tags["sweep_overrides"] = fit_value(" ".join(overrides), MAX_TAG_VAL_LENGTH)
        commit = git_commit()
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            self._experiment_id = ensure_experiment(self._client, self.experiment)
            run = self._reopen(sweep_dir)
            resumed = run is not None
            if run is None:
                run = self._client.create_run(self._experiment_id, run_name=self.name, tags=tags)
        except Exception as exc:
            warnings.warn(
                f"could not create the sweep's parent MLflow run at {self.uri} ({exc}); jobs are "
                "logged as separate top-level runs",
                TrackingWarning,
                stacklevel=2,
            )
            return
        self.run_id = run.info.run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / PARENT_RUN_FILE).write_text(self.run_id)
        os.environ[PARENT_RUN_ENV] = self.run_id
        atexit.register(self._end, "FAILED")
        self._sweep_dir = sweep_dir
        again = (" (resumed: finished jobs are skipped, unfinished ones continue from their checkpoints; "
                 "pass hydra.sweep.dir=NEW_FOLDER for a fresh sweep)") if resumed else ""
        print(f"multirun {sweep_dir}: MLflow parent run {self.run_id} at {self.uri}{again}", file=sys.stderr, flush=True)

    def _reopen(self, sweep_dir: Path):
        """The parent run of an earlier launch into ``sweep_dir``, set RUNNING again, or None.
        A rerun of a sweep resumes its jobs in their own folders and MLflow runs (train/app.py),
        so they stay children of the one parent; a parent file whose run is not in this store
        (another tracking URI, a deleted run) starts a new parent. Without the file (a fresh clone
        or machine that carried the store but not the sweep folder) the newest parent of this
        sweep logged from a folder of the same name is reopened: its finished jobs are then
        skipped by their runs in the store (train/trainer.py)."""
        path = sweep_dir / PARENT_RUN_FILE
        if path.exists():
            try:
                run = self._client.get_run(path.read_text().strip())
            except Exception:
                return None
        else:
            parents = [r for r in self._client.search_runs([self._experiment_id], f"tags.sweep = '{self.name}'",
                                                           order_by=["attributes.start_time DESC"])
                       if PARENT_TAG not in r.data.tags and Path(r.data.tags.get("sweep_dir", "")).name == sweep_dir.name]
            if not parents:
                return None
            run = parents[0]
        if run.info.experiment_id != self._experiment_id or run.info.lifecycle_stage != "active":
            return None
        self._client.update_run(run.info.run_id, status="RUNNING")
        return run

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        atexit.unregister(self._end)
        try:
            children = self._client.search_runs(
                [self._experiment_id], filter_string=f"tags.{PARENT_TAG} = '{self.run_id}'"
            )
            failed = any(run.info.status in ("FAILED", "KILLED") for run in newest_per_folder(children))
        except Exception as exc:
            warnings.warn(
                f"could not read the sweep's child runs at {self.uri} ({exc}); ending it FINISHED",
                TrackingWarning,
                stacklevel=2,
            )
            failed = False
        run_id = self.run_id
        self._end("FAILED" if failed else "FINISHED")
        # What a researcher does next, with the names this sweep was logged under.
        print(f"multirun {self._sweep_dir} ended {'FAILED' if failed else 'FINISHED'} (MLflow parent run {run_id}); "
              f"report: python -m moe_morpheus.report experiment={self.experiment} sweep={self.name} "
              f"tracking_uri={self.uri}", file=sys.stderr, flush=True)

    def _end(self, status: str) -> None:
        try:
            self._client.set_terminated(self.run_id, status)
        except Exception as exc:
            warnings.warn(
                f"could not end the sweep's parent MLflow run {self.run_id} at {self.uri} ({exc})",
                TrackingWarning,
                stacklevel=2,
            )
        if os.environ.get(PARENT_RUN_ENV) == self.run_id:
            del os.environ[PARENT_RUN_ENV]
        self.run_id = None
