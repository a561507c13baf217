"""``python -m moe_morpheus.report experiment=NAME [sweep=NAME | parent=RUN_ID]
[tracking_uri=URI] [out=DIR]``: write ``report.md``, ``report.html`` and PNGs.

Exit codes: 0 report written (even when it only lists problems, e.g. an experiment without
runs); 2 bad arguments or an unknown experiment, sweep or parent run (the message lists what
exists).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from moe_morpheus.config import ConfigError
from moe_morpheus.config.cli import fail, option, parse_options
from moe_morpheus.report.build import make_report
from moe_morpheus.report.collect import SelectionError, collect
from moe_morpheus.tracking.names import resolve_uri, sqlite_path


@dataclass
class ReportOptions:
    experiment: str = option(help="MLflow experiment name (or an experiment config name, matched on the runs' "
                                  "`experiment` tag)")
    sweep: str | None = option(None, help="only the runs of this sweep (tag `sweep`)")
    parent: str | None = option(None, help="only the child runs of this parent run id")
    tracking_uri: str | None = option(None, help="MLflow tracking URI (default sqlite:///mlflow.db here)")
    out: Path | None = option(None, help="output folder (default reports/<experiment>[_<sweep or parent>])")

    def __post_init__(self) -> None:
        if self.sweep and self.parent:
            raise ConfigError(f"sweep={self.sweep} and parent={self.parent}: pick one selection")


def main(argv: list[str] | None = None) -> int:
    try:
        args, _ = parse_options(ReportOptions, sys.argv[1:] if argv is None else argv, prog="moe_morpheus.report",
                                summary=__doc__.split("\n\n")[0])
    except ConfigError as error:
        return fail(error)
    # One tqdm bar per moe_load.json download would bury the output; a user's setting wins.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    uri = resolve_uri(args.tracking_uri)
    # MLflow would create an empty database at a mistyped path; say it is missing instead.
    if (db := sqlite_path(uri)) is not None and not db.exists():
        return fail(f"no MLflow database at {db} (pass tracking_uri=...)")
    try:
        collection = collect(uri, args.experiment, sweep=args.sweep, parent=args.parent)
    except SelectionError as error:
        return fail(error)
    suffix = args.sweep or args.parent
    out = args.out or Path("reports") / (args.experiment + (f"_{suffix}" if suffix else ""))
    md, page = make_report(collection, out)
    print(f"wrote {md} and {page} ({len(collection.runs)} runs, {len(collection.problems)} problems)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
