"""The MLflow store itself: bounded HTTP retries, whether it answers (and accepts our credentials),
which errors no retry can fix, and the experiment (created once, marked as classic model
development so the MLflow 3 UI opens it on the runs table)."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE

from moe_morpheus.tracking.names import PARENT_TAG, TrackingUnreachableError, resolve_uri

# MLflow 3's experiment tag for the kind of work (read by the UI, mlflow/server/js: "genai_development"
# opens the GenAI overview, traces and all; "custom_model_development" opens the runs table). An
# experiment without it is inferred from its content, and a new, empty one showed "Traces 0".
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# HTTP answers that mean "who are you" rather than "bad request": a retry with the right
# credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD) succeeds, so records are kept, not dropped.
AUTH_STATUSES = (401, 403)
CREDENTIALS_HINT = ("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (the shared server's basic "
                    "authentication, scripts/mlflow_server.sh)")


def limit_http_retries() -> None:
    # MLflow's client retries a refused connection for minutes by default; 0 retries and a 5 s
    # timeout make an outage cost milliseconds (refused) or 5 s per retry interval (black hole).
    # setdefault: a user who exported their own values keeps them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def check_reachable(uri: str | None, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnreachableError` naming the URI unless the store answers.

    For the app's strict mode; without it a Tracker spools locally instead. HTTP(S) servers are
    asked for ``/health`` (any HTTP answer there counts: a proxy saying 401 is reachable), then
    for one experiment, so missing or wrong credentials fail here with the fix; other stores
    (SQLite, databases) are asked for one experiment, which for SQLite also creates the database.
    """
    uri = resolve_uri(uri)
    limit_http_retries()
    try:
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                    pass
            except urllib.error.HTTPError:
                pass
        MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except MlflowException as exc:
        if exc.get_http_status_code() in AUTH_STATUSES:
            raise TrackingUnreachableError(
                f"MLflow tracking server {uri} refused the credentials: {CREDENTIALS_HINT}"
            ) from exc
        raise _unreachable(uri, exc) from exc
    except Exception as exc:
        raise _unreachable(uri, exc) from exc


def _unreachable(uri: str, exc: Exception) -> TrackingUnreachableError:
    return TrackingUnreachableError(
        f"MLflow tracking store {uri} is not reachable ({exc}). Start the server, fix "
        "tracking.uri, or drop strict mode to train with local spooling."
    )


def is_permanent(exc: Exception) -> bool:
    """True for errors about the request itself, which no retry can fix: MLflow's 4xx codes
    (except 429, rate limiting, and 401/403, credentials) and INVALID_STATE (e.g. a deleted
    run), which MLflow maps to HTTP 500 although retrying it would block the spool forever."""
    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return (400 <= status < 500 and status != 429 and status not in AUTH_STATUSES) or exc.error_code == "INVALID_STATE"


def is_auth_error(exc: Exception) -> bool:
    return isinstance(exc, MlflowException) and exc.get_http_status_code() in AUTH_STATUSES


def ensure_experiment(client: MlflowClient, name: str) -> str:
    """The id of experiment ``name``, created if missing; either way it is marked as classic model
    development unless someone chose its kind already (the tag is theirs then)."""
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
        except MlflowException as exc:
            # Another process created it between our lookup and create.
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            exp = client.get_experiment_by_name(name)
    if exp.lifecycle_stage == "deleted":
        raise MlflowException(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore) "
            "or choose another experiment name",
            error_code=INVALID_STATE,
        )
    if EXPERIMENT_KIND_TAG not in exp.tags:
        # Experiments made before this tag existed here, or by another tool.
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def job_folder(run) -> str | None:
    """The name of the job folder a run was logged from (tag ``run_dir``), or None. It names the
    job within its sweep wherever the sweep ran (folders are named after the job's overrides,
    config/keys.py), so a store carried to another machine or clone still identifies its jobs."""
    run_dir = run.data.tags.get("run_dir")
    return Path(run_dir).name if run_dir else None


def job_path(run, sweep_dir: str | None) -> tuple[str, ...] | None:
    """The folders from the sweep's folder ``sweep_dir`` down to a run's job folder (tag
    ``run_dir``), e.g. ``("s2", "dense")`` for a stage of the staged upcycling driver, whose
    stages of different seeds share a folder name; ``(name,)`` when ``run_dir`` is not under
    ``sweep_dir`` (a Hydra job folder, named after the whole job). None without ``run_dir``."""
    name = job_folder(run)
    if name is None:
        return None
    if sweep_dir:
        try:
            return Path(run.data.tags["run_dir"]).relative_to(sweep_dir).parts or (name,)
        except ValueError:
            pass
    return (name,)


def finished_job(client: MlflowClient, parent_run_id: str, run_dir: Path) -> str | None:
    """The id of a FINISHED run of the sweep job in ``run_dir`` under ``parent_run_id``, or None.
    A run matches when its folder path under the sweep folder that the parent run recorded
    (:func:`job_path`) ends ``run_dir``: found after the job's folder and checkpoints are gone or
    the sweep moved to another clone, and ``s1/dense`` is not ``s2/dense``."""
    parent = client.get_run(parent_run_id)
    sweep_dir = parent.data.tags.get("sweep_dir")
    runs = client.search_runs([parent.info.experiment_id], max_results=10_000,
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'FINISHED'")
    for run in runs:
        path = job_path(run, sweep_dir)
        if path and Path(run_dir).parts[-len(path):] == path:
            return run.info.run_id
    return None
