"""Artifacts carried beside a SQLite store, so that a store committed from one machine keeps its
runs' small artifacts on another (``studies/``: a report's expert-load heatmaps).

A run's artifacts live outside the database, under its ``artifact_uri``: the experiment's
artifact location at the time the run was created, a path on the machine that logged it. A
store snapshot (``tracking/snapshot.py``) copies every local artifact file of up to 1 MiB (a
run's ``config.yaml``, a MoE run's ``moe_load.json``: a few KiB each) into ``artifacts/<run id>/``
beside the copy, and readers look there when the run's own folder is gone
(:func:`carried_artifact`). A working store started from a snapshot in the same folder finds the
older runs' artifacts in the same place.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlparse

from moe_morpheus.tracking.names import sqlite_path

ARTIFACTS = "artifacts"
MAX_ARTIFACT_BYTES = 1 << 20


def carried_artifacts(store: Path) -> Path:
    """The folder beside SQLite store ``store`` that holds carried artifacts, one folder per run id."""
    return store.parent / ARTIFACTS


def carried_artifact(tracking_uri: str, run_id: str, path: str) -> Path | None:
    """Artifact ``path`` of run ``run_id`` as carried beside the SQLite store ``tracking_uri``, or
    None (not there, or not a SQLite store)."""
    store = sqlite_path(tracking_uri)
    if store is None:
        return None
    found = carried_artifacts(store) / run_id / path
    return found if found.is_file() else None


def local_folder(artifact_uri: str | None) -> Path | None:
    """The local folder of an artifact URI: ``file:`` URIs decoded (a host other than localhost
    is another machine: None), plain paths taken as written (``#`` and ``%`` are file name
    characters there); None for remote stores (``s3://``, ``mlflow-artifacts:``, ...)."""
    if not artifact_uri:
        return None
    if artifact_uri.startswith("file:"):
        parsed = urlparse(artifact_uri)
        return Path(unquote(parsed.path)) if parsed.netloc in ("", "localhost") and parsed.path else None
    return None if "://" in artifact_uri or artifact_uri.startswith("mlflow-artifacts:") else Path(artifact_uri)


def carry_artifacts(store: Path, dst_folder: Path) -> tuple[int, list[str]]:
    """Copy the local artifact files of every run of SQLite store ``store`` of at most
    MAX_ARTIFACT_BYTES into ``dst_folder/<run id>/``, each one best-effort (a file that cannot be
    read or written is reported, the others are copied); returns (files copied, problems)."""
    db = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        runs = db.execute("SELECT run_uuid, artifact_uri FROM runs").fetchall()
    finally:
        db.close()
    copied, problems = 0, []
    for run_id, artifact_uri in runs:
        folder = local_folder(artifact_uri)
        if folder is None or not folder.is_dir():
            continue
        for file in sorted(f for f in folder.rglob("*") if f.is_file()):
            try:
                if file.stat().st_size > MAX_ARTIFACT_BYTES:
                    problems.append(f"{file} is over {MAX_ARTIFACT_BYTES // 2**20} MiB, not carried")
                    continue
                target = dst_folder / run_id / file.relative_to(folder)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
                copied += 1
            except OSError as exc:
                problems.append(f"{file} not carried: {exc}")
    return copied, problems
