"""``python -m moe_morpheus.tracking sync RUN_FOLDER [uri=URI] [status=KILLED] [timeout_s=0]``:
deliver a run's spooled MLflow records (``RUN_FOLDER/mlflow/spool.jsonl``, left when the server
was away at the end of the run) in their original order and with their original timestamps,
then end the run with the status it finished with (as ``wandb sync`` does).

A run whose process died before finishing (SIGKILL, a node lost) has no end record and stays
RUNNING on the server; ``status=KILLED`` (or FAILED, FINISHED) ends it. Run it after the run's
process has ended: two deliverers of one spool would send its records twice.

Exit codes: 0 everything delivered; 1 the server is still away (the spool is kept, run it
again later); 2 bad arguments or a folder without a spool (the message says which).
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.tracking.names import LOCAL_SUBDIR, RUN_STATUSES, TrackingWarning, resolve_uri
from moe_morpheus.tracking.tracker import TARGET_FILE, Tracker

SUMMARY = __doc__.split("\n\n")[0]


@dataclass
class SyncOptions:
    run_dir: Path = option(help="the run folder (outputs/<name>/<run>), or its mlflow/ folder; also the first "
                                "argument after `sync`")
    uri: str | None = option(None, help="MLflow tracking URI (default: the one the run used, from "
                                        "mlflow/spool_target.json)")
    status: str | None = option(None, help="end a run that is still RUNNING because its process died: "
                                           "KILLED, FAILED or FINISHED")
    timeout_s: float = option(0.0, help="wait this long for an absent server, asking every 2 s")

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in RUN_STATUSES:
            raise ConfigError(f"status={self.status}: choose one of {', '.join(RUN_STATUSES)}")
        if self.timeout_s < 0:
            raise ConfigError(f"timeout_s={self.timeout_s} must be >= 0")


def parse(argv: list[str]) -> SyncOptions:
    if argv[:1] != ["sync"] and not {"--help", "-h"} & set(argv):
        raise ConfigError(f"{' '.join(argv) or 'no command'}: the command is `sync RUN_FOLDER` "
                          "(python -m moe_morpheus.tracking sync outputs/<name>/<run>)")
    rest = argv[1:] if argv[:1] == ["sync"] else argv
    if rest and "=" not in rest[0] and not rest[0].startswith("-"):
        rest = [f"run_dir={rest[0]}", *rest[1:]]
    options, _ = parse_options(SyncOptions, rest, prog="moe_morpheus.tracking sync", summary=SUMMARY)
    return options


def sync(options: SyncOptions) -> int:
    run_dir = options.run_dir.resolve()
    if run_dir.name == LOCAL_SUBDIR and not (run_dir / LOCAL_SUBDIR).is_dir():
        run_dir = run_dir.parent
    if not run_dir.is_dir():
        return fail(f"no run folder at {options.run_dir}: pass the folder of the run (outputs/<name>/<run>)")
    spool = run_dir / LOCAL_SUBDIR / "spool.jsonl"
    if not spool.exists():
        print(f"nothing to sync: {run_dir} holds no undelivered MLflow records ({spool} is absent)")
        return end_running(run_dir, options) if options.status else 0
    target_path = spool.parent / TARGET_FILE
    target = json.loads(target_path.read_text()) if target_path.exists() else {}
    uri = options.uri or target.get("uri")
    if uri is None:
        return fail(f"{target_path} is missing: pass uri=... (the tracking URI the run logged to)")
    with warnings.catch_warnings():
        # "N undelivered records from an earlier process": they are what this command is for.
        warnings.simplefilter("ignore", TrackingWarning)
        tracker = Tracker(resolve_uri(uri), target.get("experiment", "moe_morpheus"), "sync", rank=0, tags={},
                          local_dir=run_dir, finish_timeout_s=0)
    records = tracker.pending
    ended = {r["key"] for r in records if r["op"] == "terminate"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TrackingWarning)
        done = tracker.flush(options.timeout_s)
    runs = {tracker.run_id_of(r): r["key"] for r in records if tracker.run_id_of(r)}
    if not done:
        reason = str(caught[0].message) if caught else "no answer"
        print(f"{len(tracker.pending)} of {len(records)} records not delivered to {tracker.uri} ({reason}); "
              f"they stay in {spool}: run this again when it answers", file=sys.stderr)
        return 1
    for message in {str(w.message) for w in caught}:
        print(f"warning: {message}", file=sys.stderr)
    client = MlflowClient(tracking_uri=tracker.uri)
    for run_id, key in sorted(runs.items()):
        run = client.get_run(run_id)
        if run.info.status == "RUNNING" and key not in ended:
            if options.status is None:
                print(f"run {run_id} is still RUNNING: its process ended without finishing; "
                      f"end it with `python -m moe_morpheus.tracking sync {run_dir} status=KILLED`")
                continue
            client.set_terminated(run_id, options.status)
            run = client.get_run(run_id)
        print(f"delivered {len(records)} records to {tracker.uri}: run {run_id} "
              f"({run.info.run_name}) is {run.info.status}")
    return 0


def end_running(run_dir: Path, options: SyncOptions) -> int:
    """End the RUNNING runs logged from ``run_dir`` (tag ``run_dir``) with ``options.status``: a run
    whose process died while the server was up has no spool, only a run left RUNNING."""
    client = MlflowClient(tracking_uri=resolve_uri(options.uri))
    ids = [e.experiment_id for e in client.search_experiments()]
    found = client.search_runs(ids, filter_string=f"tags.run_dir = '{run_dir}' and attributes.status = 'RUNNING'")
    for run in found:
        client.set_terminated(run.info.run_id, options.status)
        print(f"run {run.info.run_id} ({run.info.run_name}) was RUNNING: now {options.status}")
    if not found:
        print(f"no RUNNING run at {client.tracking_uri} was logged from {run_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    try:
        options = parse(sys.argv[1:] if argv is None else argv)
    except ConfigError as error:
        return fail(error)
    return sync(options)
