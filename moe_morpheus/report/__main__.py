"""``python -m moe_morpheus.report --experiment NAME [--sweep NAME | --parent RUN_ID]
[--tracking-uri URI] [--out DIR]``: write ``report.md``, ``report.html`` and PNGs.

Exit codes: 0 report written (even when it only lists problems, e.g. an experiment without
runs); 2 bad arguments or an unknown experiment, sweep or parent run (the message lists what
exists).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from moe_morpheus.report.build import make_report
from moe_morpheus.report.collect import SelectionError, collect
from moe_morpheus.tracking.names import resolve_uri


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moe_morpheus.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--experiment", required=True,
                   help="MLflow experiment name (or an experiment config name, matched on the runs' "
                        "`experiment` tag)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--sweep", help="only the runs of this sweep (tag `sweep`)")
    which.add_argument("--parent", help="only the child runs of this parent run id")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///mlflow.db in the current directory)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (default: reports/<experiment>[_<sweep or parent>])")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # One tqdm bar per moe_load.json download would bury the output; a user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_uri(args.tracking_uri)
    # MLflow would create an empty database at a mistyped path; say it is missing instead.
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        print(f"error: no MLflow database at {uri[len('sqlite:///'):]} (pass --tracking-uri)", file=sys.stderr)
        return 2
    try:
        collection = collect(uri, args.experiment, sweep=args.sweep, parent=args.parent)
    except SelectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    suffix = args.sweep or args.parent
    out = args.out or Path("reports") / (args.experiment + (f"_{suffix}" if suffix else ""))
    md, page = make_report(collection, out)
    print(f"wrote {md} and {page} ({len(collection.runs)} runs, {len(collection.problems)} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
