"""MLflow glue: one MLflow run per training run, one parent run per Hydra multirun sweep.

The trainer builds a :class:`Tracker` on every rank; only rank 0 talks to MLflow, the others
are no-ops. Tracking is a side concern and must never stop training, so every MLflow call goes
through a small delivery queue:

* A call that fails for a reason that may go away (server down, connection refused, timeout,
  SQLite "database is locked") is appended, in order, to a JSONL spool file
  ``<local_dir>/mlflow/spool.jsonl`` and a warning naming the URI is issued once per outage.
  While the spool is non-empty every new record goes to the spool too (so order is kept), and
  at most every ``retry_interval_s`` seconds the spool is replayed; ``finish`` tries once more
  regardless of the interval. Records keep the wall-clock time at which they were made, so
  replayed metrics have their original timestamps.
* A call that MLflow rejects as invalid (HTTP 4xx: bad name, unknown run) is dropped with a
  warning: retrying it could never succeed and would block the queue behind it.
* Records still undelivered when the process ends stay in the spool file. A later Tracker with
  the same ``local_dir`` (a resumed run) adopts and replays them before its own records.

MLflow's HTTP client retries for minutes by default; trackers set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` unless the user set
them, so a refused connection costs milliseconds and a black-holed host at most 5 s per retry
interval. Async logging is not used: it reports failures later, on another thread, which would
break the spool's ordering and the "nothing is lost" promise.

Resume: MLflow params are immutable. Re-logging an identical param is skipped; a param whose
value changed is logged as the tag ``param_changed.<key>`` (the param keeps its first value) and
a warning lists the changed keys.

Sweeps: :class:`MLflowSweepCallback` creates the parent run in ``on_multirun_start`` (also the
moment the SQLite database and the experiment are created, once, before any job could race on
them) and publishes its id in the file ``<hydra.sweep.dir>/mlflow_parent_run_id`` (read by jobs
in any process: basic launcher, joblib, submitit) and in the environment variable
``MOE_MORPHEUS_PARENT_RUN_ID`` (inherited by processes a job spawns, e.g. torchrun ranks). Jobs
get it with :func:`parent_run_id`.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
import uuid
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE
from mlflow.utils.validation import (
    MAX_ENTITY_KEY_LENGTH,
    MAX_METRICS_PER_BATCH,
    MAX_PARAM_VAL_LENGTH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)
from omegaconf import DictConfig

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MOE_MORPHEUS_PARENT_RUN_ID"
PARENT_RUN_FILE = "mlflow_parent_run_id"
PARENT_TAG = "mlflow.parentRunId"
TRUNCATION_MARKER = "...[truncated]"
VARIANTS = ("dense", "moe", "upcycled")
RUN_STATUSES = ("FINISHED", "FAILED", "KILLED")
# The folder inside a run's local_dir that holds the spool and the staged config artifact.
LOCAL_SUBDIR = "mlflow"

# MLflow accepts only these characters in param, metric and tag keys (on POSIX); one bad key
# would get a whole batch of 100 params rejected, so keys are sanitised instead.
_BAD_KEY_CHARS = re.compile(r"[^/\w.\- :]")


class TrackingWarning(UserWarning):
    """Tracking degraded (server unreachable, record rejected); training goes on."""


class TrackingUnreachableError(RuntimeError):
    """The tracking store cannot be reached; raised only by :func:`check_reachable` (strict mode)."""


def resolve_uri(uri: str | None) -> str:
    """The tracking URI with any SQLite path made absolute against the current directory.

    None means MLflow's default, ``mlflow.db`` in the launch directory (the current directory
    under Hydra's ``hydra.job.chdir=False``). Resolving once, up front, keeps every job and
    rank on the same database even if something changes directory later.
    """
    if uri is None:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return f"{prefix}{(Path.cwd() / uri[len(prefix):]).resolve()}"
    return uri


def _fit_key(key: str) -> str:
    """A valid MLflow key: bad characters replaced, over-long keys shortened with a hash so two
    long keys sharing a prefix stay distinct."""
    key = _BAD_KEY_CHARS.sub("_", key)
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:8]
    return f"{key[: MAX_ENTITY_KEY_LENGTH - 9]}-{digest}"


def _fit_value(value: str, limit: int) -> str:
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mappings as dotted keys with string values, within MLflow's param limits.

    Lists are stringified whole (a list index is not a config key a researcher filters on).
    Keys longer than 250 characters are shortened with a hash suffix, values longer than
    6000 characters end in ``...[truncated]``.
    """
    flat: dict[str, str] = {}
    for key, value in cfg.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_config(value, dotted))
        else:
            flat[_fit_key(dotted)] = _fit_value(str(value), MAX_PARAM_VAL_LENGTH)
    return flat


def _chunks(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def git_commit(repo_dir: str | Path | None = None) -> str | None:
    """``git rev-parse HEAD`` of the checkout holding this package (or ``repo_dir``); None when
    git or the repository is missing, so it never fails a run."""
    cwd = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def run_tags(
    variant: str,
    experiment: str,
    sweep: str | None,
    parallel_layout: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The tags every training run carries (reports group and filter on them)."""
    if variant not in VARIANTS:
        raise ValueError(f"run_tags: variant={variant!r} is not one of {VARIANTS}")
    tags = {"variant": variant, "experiment": experiment, "parallel_layout": parallel_layout}
    if sweep is not None:
        tags["sweep"] = sweep
    commit = git_commit()
    if commit is not None:
        # MLflow's own key, so the UI links the commit; set explicitly because MLflow only
        # fills it in for fluent runs started from a script inside the checkout.
        tags["mlflow.source.git.commit"] = commit
    tags.update(extra or {})
    return tags


def _limit_http_retries() -> None:
    # setdefault: a user who exported their own values keeps them.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


def check_reachable(uri: str | None, timeout: float = 5.0) -> None:
    """Raise :class:`TrackingUnreachableError` naming the URI unless the store answers.

    For the app's strict mode; without it a Tracker spools locally instead. HTTP(S) servers
    are asked for ``/health`` (any HTTP answer counts: an auth proxy saying 401 is reachable);
    other stores (SQLite, databases) are asked for one experiment, which for SQLite also
    creates the database.
    """
    uri = resolve_uri(uri)
    _limit_http_retries()
    try:
        if uri.startswith(("http://", "https://")):
            try:
                with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout):
                    pass
            except urllib.error.HTTPError:
                pass
        else:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
    except Exception as exc:
        raise TrackingUnreachableError(
            f"MLflow tracking store {uri} is not reachable ({exc}). Start the server, fix "
            "tracking.uri, or drop strict mode to train with local spooling."
        ) from exc


def _is_permanent(exc: Exception) -> bool:
    """True for errors about the request itself, which no retry can fix: MLflow's 4xx codes
    (except 429, rate limiting) and INVALID_STATE (e.g. a deleted run), which MLflow maps to
    HTTP 500 although retrying it would block the spool forever."""
    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return (400 <= status < 500 and status != 429) or exc.error_code == "INVALID_STATE"


def _ensure_experiment(client: MlflowClient, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
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
    return exp.experiment_id


def _now_ms() -> int:
    return int(time.time() * 1000)


class Tracker:
    """One training run in MLflow, logged by rank 0 only, resilient to a tracking outage.

    ``uri`` None means ``mlflow.db`` in the launch directory (see :func:`resolve_uri`).
    ``parent_run_id`` makes the run a nested child of a sweep's parent run;
    ``resume_run_id`` continues an existing run (metric history appended, params kept).
    ``local_dir`` is the run's output directory: the spool and the staged config artifact
    live in its ``mlflow/`` folder. During an outage the spool is replayed at most every
    ``retry_interval_s`` seconds, so a server that times out slows training by a bounded share.
    """

    def __init__(
        self,
        uri: str | None,
        experiment: str,
        run_name: str,
        *,
        rank: int,
        tags: Mapping[str, str],
        parent_run_id: str | None = None,
        resume_run_id: str | None = None,
        local_dir: str | Path,
        retry_interval_s: float = 60.0,
    ) -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.retry_interval_s = retry_interval_s
        self._active = rank == 0
        self._tags = dict(tags)
        self._parent_run_id = parent_run_id
        self._resume_run_id = resume_run_id
        self._run_id = resume_run_id
        # Records name their run by a local key until MLflow has assigned the id, so a run
        # whose creation was spooled still gets its metrics when the spool is replayed.
        self._key = uuid.uuid4().hex
        self._run_ids: dict[str, str] = {self._key: resume_run_id} if resume_run_id else {}
        self._pending: list[dict[str, Any]] = []
        self._next_retry = 0.0
        self._outage = False
        self._warned: set[str] = set()
        self._last_step = 0
        self._finished = False
        self._client: MlflowClient | None = None
        self._dir = Path(local_dir) / LOCAL_SUBDIR
        self.spool_path = self._dir / "spool.jsonl"
        if not self._active:
            return
        _limit_http_retries()
        if self.spool_path.exists():
            with self.spool_path.open() as f:
                self._pending = [json.loads(line) for line in f if line.strip()]
            if self._pending:
                self._warn(
                    f"{self.spool_path} holds {len(self._pending)} undelivered MLflow records "
                    "from an earlier process; they are replayed before this run's records"
                )

    @property
    def run_id(self) -> str | None:
        """The MLflow run id; None on ranks other than 0 and while the run's creation is spooled."""
        return self._run_id

    def start(self, params: Mapping[str, Any], config_yaml: str) -> None:
        """Create (or resume) the run; log tags, the flattened params and ``config.yaml``."""
        if not self._active:
            return
        if self._resume_run_id is not None:
            self._submit({"op": "resume"})
        else:
            self._submit(
                {
                    "op": "create",
                    "experiment": self.experiment,
                    "run_name": self.run_name,
                    "parent": self._parent_run_id,
                    "time": _now_ms(),
                }
            )
        if self._tags:
            self._submit({"op": "tags", "tags": self._tags})
        self._submit({"op": "params", "params": flatten_config(params)})
        self._dir.mkdir(parents=True, exist_ok=True)
        config_path = self._dir / "config.yaml"
        config_path.write_text(config_yaml)
        self._submit({"op": "artifact", "path": str(config_path.resolve())})

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log metrics against the training step. Values go through ``float()`` here, so a
        non-numeric value is the caller's bug and raises at once, not at replay."""
        if not self._active:
            return
        self._last_step = int(step)
        values = {k: float(v) for k, v in metrics.items()}
        self._submit({"op": "metrics", "metrics": values, "step": int(step), "time": _now_ms()})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self._active:
            return
        self._submit({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_artifact(self, path: str | Path) -> None:
        """Upload a file. A spooled upload reads the file at replay time, so keep it there."""
        if not self._active:
            return
        self._submit({"op": "artifact", "path": str(Path(path).resolve())})

    def finish(self, status: str, summary: Mapping[str, float] | None = None) -> None:
        """Log ``summary`` metrics at the last step, end the run with ``status``, and make a last
        delivery attempt; whatever is still undelivered stays in the spool with a warning."""
        if status not in RUN_STATUSES:
            raise ValueError(f"Tracker.finish: status={status!r} is not one of {RUN_STATUSES}")
        if not self._active or self._finished:
            return
        self._finished = True
        if summary:
            self.log_metrics(summary, self._last_step)
        self._submit({"op": "terminate", "status": status, "time": _now_ms()})
        if self._pending:
            self._drain()
        if self._pending:
            self._warn(
                f"{len(self._pending)} MLflow records could not be delivered to {self.uri}; they "
                f"stay in {self.spool_path} and are replayed by the next Tracker using this local_dir"
            )

    # Delivery queue -------------------------------------------------------------------------

    def _submit(self, record: dict[str, Any]) -> None:
        record["key"] = self._key
        record["run_id"] = self._run_id
        if self._pending:
            self._spool(record)
            if time.monotonic() >= self._next_retry:
                self._drain()
            return
        try:
            self._deliver(record)
        except Exception as exc:
            self._spool(record)
            self._on_outage(exc)

    def _spool(self, record: dict[str, Any]) -> None:
        self._pending.append(record)
        self._dir.mkdir(parents=True, exist_ok=True)
        with self.spool_path.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _drain(self) -> None:
        delivered = 0
        try:
            for record in self._pending:
                self._deliver(record)
                delivered += 1
        except Exception as exc:
            self._on_outage(exc)
        if not delivered:
            return
        self._pending = self._pending[delivered:]
        if self._pending:
            tmp = self.spool_path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self._pending))
            os.replace(tmp, self.spool_path)
        else:
            self.spool_path.unlink(missing_ok=True)
            self._outage = False
            log.info("MLflow at %s answers again; replayed %d spooled records", self.uri, delivered)

    def _on_outage(self, exc: Exception) -> None:
        self._next_retry = time.monotonic() + self.retry_interval_s
        if not self._outage:
            self._outage = True
            self._warn(
                f"MLflow tracking at {self.uri} failed ({exc}); training continues, records are "
                f"spooled to {self.spool_path} and replayed when it answers "
                f"(retry every {self.retry_interval_s:g} s)"
            )

    def _warn(self, message: str) -> None:
        warnings.warn(message, TrackingWarning, stacklevel=2)

    def _deliver(self, record: dict[str, Any]) -> None:
        """Execute one record; drop it with a warning if MLflow rejects it as invalid,
        re-raise anything that might succeed later."""
        try:
            self._execute(record)
        except Exception as exc:
            if not _is_permanent(exc):
                raise
            reason = f"{record['op']}:{exc.error_code}"
            if reason not in self._warned:
                self._warned.add(reason)
                self._warn(f"MLflow rejected a {record['op']} record ({exc.message}); it is dropped")

    def _bind(self, key: str, run_id: str) -> None:
        self._run_ids[key] = run_id
        if key == self._key:
            self._run_id = run_id
        for record in self._pending:
            if record["key"] == key:
                record["run_id"] = run_id

    def _execute(self, record: dict[str, Any]) -> None:
        if self._client is None:
            self._client = MlflowClient(tracking_uri=self.uri)
        client = self._client
        op = record["op"]
        if op == "create":
            exp_id = _ensure_experiment(client, record["experiment"])
            tags = {PARENT_TAG: record["parent"]} if record["parent"] else {}
            run = client.create_run(
                exp_id, start_time=record["time"], tags=tags, run_name=record["run_name"]
            )
            self._bind(record["key"], run.info.run_id)
            return
        run_id = record["run_id"] or self._run_ids.get(record["key"])
        if run_id is None:
            raise MlflowException(
                f"no MLflow run to log a {op} record to (its creation was rejected)",
                error_code=INVALID_STATE,
            )
        if op == "resume":
            client.update_run(run_id, status="RUNNING")
        elif op == "params":
            self._log_params(client, run_id, record["params"])
        elif op == "metrics":
            metrics = [
                Metric(_fit_key(k), v, record["time"], record["step"])
                for k, v in record["metrics"].items()
            ]
            for batch in _chunks(metrics, MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=batch)
        elif op == "tags":
            tags = [
                RunTag(_fit_key(k), _fit_value(str(v), MAX_TAG_VAL_LENGTH))
                for k, v in record["tags"].items()
            ]
            for batch in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=batch)
        elif op == "artifact":
            client.log_artifact(run_id, record["path"])
        else:  # "terminate"
            client.set_terminated(run_id, record["status"], end_time=record["time"])

    def _log_params(self, client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
        # Compared against what the run already holds, so replaying a half-delivered record and
        # resuming a run both skip identical params instead of tripping MLflow's immutability.
        existing = client.get_run(run_id).data.params
        new = [Param(k, v) for k, v in params.items() if k not in existing]
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != v}
        for batch in _chunks(new, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=batch)
        if changed:
            tags = [RunTag(_fit_key(f"param_changed.{k}"), v) for k, v in changed.items()]
            for batch in _chunks(tags, MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=batch)
            self._warn(
                f"run {run_id} resumed with changed params {sorted(changed)}; MLflow params are "
                "immutable, so the new values are logged as tags param_changed.<key>"
            )


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
        _limit_http_retries()
        tags = {"sweep": self.name, "sweep_dir": str(sweep_dir)}
        overrides = config.hydra.overrides.get("task")
        if overrides:
            tags["sweep_overrides"] = _fit_value(" ".join(overrides), MAX_TAG_VAL_LENGTH)
        commit = git_commit()
        if commit is not None:
            tags["mlflow.source.git.commit"] = commit
        try:
            self._client = MlflowClient(tracking_uri=self.uri)
            self._experiment_id = _ensure_experiment(self._client, self.experiment)
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

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        atexit.unregister(self._end)
        try:
            children = self._client.search_runs(
                [self._experiment_id], filter_string=f"tags.{PARENT_TAG} = '{self.run_id}'"
            )
            failed = any(run.info.status in ("FAILED", "KILLED") for run in children)
        except Exception as exc:
            warnings.warn(
                f"could not read the sweep's child runs at {self.uri} ({exc}); ending it FINISHED",
                TrackingWarning,
                stacklevel=2,
            )
            failed = False
        self._end("FAILED" if failed else "FINISHED")

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
