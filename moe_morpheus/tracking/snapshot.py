"""``python -m moe_morpheus.tracking.snapshot SRC DST``: a copy of an MLflow SQLite store small
enough to commit (the studies' ``studies/mlflow.db``, so that a study outlives the machine it ran on).

Every run, param and tag is kept, and every evaluation (``valid*``, ``eval/*``, ``final/*``,
``best/*``) and the curves a report draws at every logged step (``train/loss`` and the MoE layer
means ``moe/balance_loss``, ``moe/drop_rate``, ``moe/z_loss``). The other step metrics (tokens,
FLOPs, epochs, guards, throughput, gradient norms, per-layer MoE statistics: 25-30 keys a step)
are kept at the run's evaluation steps, at every ``every``-th step and at its last step: the
report places evaluations on the token and FLOP axes from those. The studies' store of 13 runs
(4 logging every step, 9 every 10th) held 118k metric rows; the snapshot keeps 18.9k (5.9 MiB).

SRC is read through SQLite's backup API, so a store that runs are writing to copies consistently.

Artifacts live outside the database, at each run's ``artifact_uri``: an absolute path on the
machine that logged it. The snapshot copies every local artifact file of up to 1 MiB (a run's
``config.yaml``, a MoE run's ``moe_load.json``: a few KiB each) into ``artifacts/<run id>/``
beside DST, and readers of a store look there when a run's own artifact folder is gone
(:func:`carried_artifact`; the report's expert-load heatmaps). A working store started from the
snapshot (``scripts/run_studies.sh``) finds the older runs' artifacts in the same folder.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

EVALUATION_PREFIXES = ("valid", "eval/", "final/", "best/")
EVERY_STEP_KEYS = ("train/loss", "moe/balance_loss", "moe/drop_rate", "moe/z_loss")
ARTIFACTS = "artifacts"
MAX_ARTIFACT_BYTES = 1 << 20
SQLITE_PREFIX = "sqlite:///"


def carried_artifacts(store: Path) -> Path:
    """The folder beside SQLite store ``store`` that holds its snapshot's artifacts, one folder per run id."""
    return store.parent / ARTIFACTS


def carried_artifact(tracking_uri: str, run_id: str, path: str) -> Path | None:
    """Artifact ``path`` of run ``run_id`` as a snapshot beside the SQLite store ``tracking_uri``
    carried it, or None (not there, or not a SQLite store)."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    found = carried_artifacts(Path(tracking_uri[len(SQLITE_PREFIX):])) / run_id / path
    return found if found.is_file() else None


def _local_folder(artifact_uri: str | None) -> Path | None:
    parsed = urlparse(artifact_uri or "")
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path)) if parsed.path else None
    return None  # a remote artifact store (s3://, mlflow-artifacts:, ...): not copied


def copy_artifacts(store: sqlite3.Connection, dst_folder: Path) -> tuple[int, list[str]]:
    """Copy the local artifact files of every run of ``store`` of at most MAX_ARTIFACT_BYTES into
    ``dst_folder/<run id>/``; returns (files copied, files skipped as too large)."""
    copied, too_large = 0, []
    for run_id, artifact_uri in store.execute("SELECT run_uuid, artifact_uri FROM runs"):
        folder = _local_folder(artifact_uri)
        if folder is None or not folder.is_dir():
            continue
        for file in sorted(f for f in folder.rglob("*") if f.is_file()):
            if file.stat().st_size > MAX_ARTIFACT_BYTES:
                too_large.append(str(file))
                continue
            target = dst_folder / run_id / file.relative_to(folder)
            if target.resolve() != file.resolve():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
                copied += 1
    return copied, too_large


def snapshot(src: Path, dst: Path, every: int = 100) -> tuple[int, int]:
    """Write the thinned copy of store ``src`` to ``dst`` (replaced atomically) and its runs' small
    artifacts to :func:`carried_artifacts` of ``dst``; returns the metric rows (before, after)."""
    if not src.is_file():
        raise FileNotFoundError(f"no MLflow SQLite store at {src}: pass the .db file runs log to")
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    source, copy = sqlite3.connect(f"file:{src}?mode=ro", uri=True), sqlite3.connect(tmp)
    try:
        try:
            source.backup(copy)
        finally:
            source.close()
        before = copy.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        evaluated = " OR ".join(f"key LIKE '{p}%'" for p in EVALUATION_PREFIXES)
        copy.execute("CREATE TEMP TABLE kept_steps AS "
                     f"SELECT DISTINCT run_uuid, step FROM metrics WHERE {evaluated} "
                     "UNION SELECT run_uuid, MAX(step) FROM metrics GROUP BY run_uuid")
        copy.execute(f"DELETE FROM metrics WHERE NOT ({evaluated}) "
                     f"AND key NOT IN ({', '.join('?' * len(EVERY_STEP_KEYS))}) AND step % ? != 0 "
                     "AND (run_uuid, step) NOT IN (SELECT run_uuid, step FROM kept_steps)",
                     (*EVERY_STEP_KEYS, every))
        copy.commit()
        after = copy.execute("SELECT COUNT(*) FROM metrics").fetchone()[0]
        copy.execute("VACUUM")
        _, too_large = copy_artifacts(copy, carried_artifacts(dst))
    finally:
        copy.close()
    os.replace(tmp, dst)
    for file in too_large:
        print(f"snapshot: {file} is over {MAX_ARTIFACT_BYTES // 2**20} MiB, not carried", file=sys.stderr)
    return before, after


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moe_morpheus.tracking.snapshot", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="the MLflow SQLite store runs log to")
    parser.add_argument("dst", type=Path, help="the copy to write (replaced if it exists)")
    parser.add_argument("--every", type=int, default=100, help="keep the other step metrics at every N-th step")
    args = parser.parse_args(argv)
    if args.every < 1:
        parser.error(f"--every={args.every} must be >= 1")
    try:
        before, after = snapshot(args.src, args.dst, args.every)
    except (FileNotFoundError, sqlite3.DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.dst}: {after:,} of {before:,} metric rows, {args.dst.stat().st_size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
