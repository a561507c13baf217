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
* ``finish`` waits up to ``finish_timeout_s`` (``tracking.finish_timeout_s``) for an absent
  server, asking every 2 s. Records still undelivered then stay in the spool file, next to
  ``spool_target.json`` (URI and experiment); ``python -m moe_morpheus.tracking sync RUN_FOLDER``
  delivers them, and a later Tracker with the same ``local_dir`` (a resumed run) adopts and
  replays them before its own records.
* A server that refuses our credentials (HTTP 401/403) is an outage too: the records wait in
  the spool for the right MLFLOW_TRACKING_USERNAME / _PASSWORD instead of being dropped.

MLflow's HTTP client retries for minutes by default; trackers set
``MLFLOW_HTTP_REQUEST_MAX_RETRIES=0`` and ``MLFLOW_HTTP_REQUEST_TIMEOUT=5`` unless the user set
them, so a refused connection costs milliseconds and a black-holed host at most 5 s per retry
interval. Async logging is not used: it reports failures later, on another thread, which would
break the spool's ordering and the "nothing is lost" promise.

Resume: MLflow params are immutable. Re-logging an identical param is skipped; a param whose
value changed is logged as the tag ``param_changed.<key>`` (the param keeps its first value) and
a warning lists the changed keys.
"""


from __future__ import annotations

import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_STATE
from mlflow.utils.validation import (
    MAX_METRICS_PER_BATCH,
    MAX_PARAMS_TAGS_PER_BATCH,
    MAX_TAG_VAL_LENGTH,
)

from moe_morpheus.config.tracking import TrackingConfig
from moe_morpheus.tracking.names import (
    LOCAL_SUBDIR,
    PARENT_TAG,
    RUN_STATUSES,
    TrackingWarning,
    batched,
    fit_key,
    fit_value,
    flatten_config,
    resolve_uri,
)
from moe_morpheus.tracking.store import (
    CREDENTIALS_HINT,
    check_reachable,
    ensure_experiment,
    is_auth_error,
    is_permanent,
    limit_http_retries,
)

# check_reachable and ensure_experiment are imported from here by train/app.py and upcycle/sweep.py.
__all__ = ["Tracker", "check_reachable", "ensure_experiment", "is_permanent", "limit_http_retries"]
log = logging.getLogger(__name__)
# The spool's companion: where its records go (python -m moe_morpheus.tracking sync reads it).
TARGET_FILE = "spool_target.json"
# While finish() waits for an absent server, it asks again this often (a refused connection costs
# milliseconds, a black-holed host MLFLOW_HTTP_REQUEST_TIMEOUT = 5 s per ask).
FINISH_POLL_S = 2.0
# An interrupted run (status KILLED) waits at most this long for an absent server: Slurm sends
# SIGKILL 30 s (its default KillWait) after the SIGTERM that stopped the run, and the checkpoint
# is already saved; what is not delivered stays in the spool for `sync`.
KILLED_WAIT_S = 10.0

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
        finish_timeout_s: float = TrackingConfig.finish_timeout_s,
    ) -> None:
        self.uri = resolve_uri(uri)
        self.experiment = experiment
        self.run_name = run_name
        self.retry_interval_s = retry_interval_s
        self.finish_timeout_s = finish_timeout_s
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
        limit_http_retries()
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

    @property
    def pending(self) -> list[dict[str, Any]]:
        """The records not yet delivered, oldest first (a copy)."""
        return list(self._pending)

    def run_id_of(self, record: Mapping[str, Any]) -> str | None:
        """The MLflow run a (delivered or pending) record belongs to, once it is known."""
        return record.get("run_id") or self._run_ids.get(record["key"])

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
            self.flush(min(self.finish_timeout_s, KILLED_WAIT_S) if status == "KILLED" else self.finish_timeout_s)
        if self._pending:
            self._warn(
                f"{len(self._pending)} MLflow records could not be delivered to {self.uri}; they "
                f"stay in {self.spool_path}: deliver them with `python -m moe_morpheus.tracking sync "
                f"{self._dir.parent}` when the server answers (a resumed run replays them too)"
            )

    def flush(self, timeout_s: float) -> bool:
        """Deliver the spool now, asking again every 2 s for up to ``timeout_s`` seconds while the
        server is away; True when nothing is left undelivered."""
        if not self._active:
            return True
        deadline = time.monotonic() + timeout_s
        self._drain()
        if self._pending and timeout_s > 0:
            log.warning("MLflow at %s does not answer; waiting up to %g s to deliver %d records "
                        "(tracking.finish_timeout_s)", self.uri, timeout_s, len(self._pending))
        while self._pending and time.monotonic() < deadline:
            time.sleep(min(FINISH_POLL_S, max(0.0, deadline - time.monotonic())))
            self._drain()
        return not self._pending

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
        if not self.spool_path.exists():
            target = {"uri": self.uri, "experiment": self.experiment}
            (self._dir / TARGET_FILE).write_text(json.dumps(target) + "\n")
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
            reason = f"refused the credentials: {CREDENTIALS_HINT}" if is_auth_error(exc) else f"failed ({exc})"
            self._warn(
                f"MLflow tracking at {self.uri} {reason}; training continues, records are "
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
            if not is_permanent(exc):
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
            exp_id = ensure_experiment(client, record["experiment"])
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
                Metric(fit_key(k), v, record["time"], record["step"])
                for k, v in record["metrics"].items()
            ]
            for batch in batched(metrics, MAX_METRICS_PER_BATCH):
                client.log_batch(run_id, metrics=batch)
        elif op == "tags":
            tags = [
                RunTag(fit_key(k), fit_value(str(v), MAX_TAG_VAL_LENGTH))
                for k, v in record["tags"].items()
            ]
            for batch in batched(tags, MAX_PARAMS_TAGS_PER_BATCH):
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
        for batch in batched(new, MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(run_id, params=batch)
        if changed:
            tags = [RunTag(fit_key(f"param_changed.{k}"), v) for k, v in changed.items()]
            for batch in batched(tags, MAX_PARAMS_TAGS_PER_BATCH):
                client.log_batch(run_id, tags=batch)
            self._warn(
                f"run {run_id} resumed with changed params {sorted(changed)}; MLflow params are "
                "immutable, so the new values are logged as tags param_changed.<key>"
            )
