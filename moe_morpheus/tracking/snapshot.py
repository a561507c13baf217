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

The runs' small artifacts are carried into ``artifacts/`` beside DST (``tracking/carried.py``),
after DST is written: a file that cannot be copied is reported and never costs the store.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from pathlib import Path

from moe_morpheus.tracking.carried import carried_artifacts, carry_artifacts

EVALUATION_PREFIXES = ("valid", "eval/", "final/", "best/")
EVERY_STEP_KEYS = ("train/loss", "moe/balance_loss", "moe/drop_rate", "moe/z_loss")


def snapshot(src: Path, dst: Path, every: int = 100) -> tuple[int, int]:
    """Write the thinned copy of store ``src`` to ``dst`` (replaced atomically); returns the metric
    rows (before, after). The runs' artifacts are carried separately (:func:`carry_artifacts`)."""
    if not src.is_file():
        raise FileNotFoundError(f"no MLflow SQLite store at {src}: pass the .db file runs log to")
    if dst.resolve() == src.resolve():
        raise ValueError(f"the snapshot would replace its source {src}: write it to another file")
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
    finally:
        copy.close()
    os.replace(tmp, dst)
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
    except (FileNotFoundError, ValueError, sqlite3.DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    copied, problems = carry_artifacts(args.dst, carried_artifacts(args.dst))
    for problem in problems:
        print(f"snapshot: {problem}", file=sys.stderr)
    print(f"{args.dst}: {after:,} of {before:,} metric rows, {args.dst.stat().st_size / 2**20:.1f} MiB; "
          f"{copied} artifact files carried into {carried_artifacts(args.dst)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
