#!/usr/bin/env bash
# The committed studies (reports/study_moe_vs_dense, reports/scaling_ladder,
# reports/upcycle_vs_scratch), in order, each followed by its report.
#
# Runs log to the working store studies/runs.db (not committed). After each sweep its snapshot,
# studies/mlflow.db (python -m moe_morpheus.tracking.snapshot: every run and evaluation, step
# metrics thinned), is rewritten with the runs' small artifacts in studies/artifacts/: commit
# both as runs finish (without artifacts/ a report made on another clone has no expert-load
# heatmaps). On a fresh clone the working store starts as a copy of the snapshot, so this script
# skips the jobs that finished anywhere (by their FINISHED runs) and resumes the others from
# their checkpoints where the multirun/ folder is still there, from scratch where it is not.
# A study's report is rewritten when it does not name every finished run of the study.
#
# About 1.5 hours with THREADS=2 on an otherwise idle 2-core machine for study 1, 2.6 planned for
# the ladder (4.6 of wall time measured, with the cores shared at times; the plans are in the
# conf/sweeps/ files), 1 for the upcycling sweep. The upcycling
# sweep's later stages start from its dense stages' checkpoints, which live in multirun/ only:
# it runs start to finish on one machine (its driver stops with the fix where it cannot; a rerun
# under a new name= would not be the sweep reports/upcycle_vs_scratch reads).
# THREADS (default 1) is the PyTorch threads per run: one leaves a core of a 2-core machine
# free; two processes of 2 threads each on 2 cores are several times slower than one, so do not
# run two of these at once. STUDIES overrides the list, e.g. STUDIES=study_moe_ablation for the
# diagnostic ablation.
#   scripts/run_studies.sh            # or: nohup scripts/run_studies.sh > studies.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
PY=.venv/bin/python
WORKING=studies/runs.db
if [ ! -f "$WORKING" ]; then
  cp studies/mlflow.db "$WORKING" || { echo "run_studies: cannot start $WORKING from studies/mlflow.db" >&2; exit 2; }
  # New runs' artifacts go to this clone's mlruns/ (the snapshot's experiments still name the
  # folder of the machine that created them); older runs' artifacts are in studies/artifacts/.
  "$PY" -c 'import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("UPDATE experiments SET artifact_location = ? || experiment_id", (sys.argv[2],))
db.commit()' "$WORKING" "$PWD/mlruns/" || exit 2
fi
STORE="sqlite:///$WORKING"
# "current" when reports/<sweep>/report.md names every finished training run of the sweep, else
# "stale" (also when the store cannot be read: then the report is made and says what is wrong).
report_state() {
  "$PY" -c 'import pathlib, sqlite3, sys
try:
    db = sqlite3.connect(f"file:{sys.argv[1]}?mode=ro", uri=True)
    ids = [r for (r,) in db.execute(
        "SELECT r.run_uuid FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid JOIN latest_metrics m "
        "ON m.run_uuid = r.run_uuid WHERE t.key = ? AND t.value = ? AND m.key = ? AND r.status = ?",
        ("sweep", sys.argv[2], "final/valid_loss", "FINISHED"))]
    report = pathlib.Path(sys.argv[3]).read_text()
    print("current" if all(i in report for i in ids) else "stale")
except (OSError, sqlite3.Error):
    print("stale")' "$WORKING" "$1" "reports/$1/report.md"
}
status=0
for sweep in ${STUDIES:-study_moe_vs_dense scaling_ladder upcycle_vs_scratch}; do
  # A failed job stops its sweep; the report still shows what finished (and lists the failure,
  # when a run finished since it was made), and the next study still runs. The exit status says
  # whether everything finished.
  if [ "$sweep" = upcycle_vs_scratch ]; then
    # The +100% extra budget only (reports/upcycle_vs_scratch/CONCLUSION.md): 15 runs.
    "$PY" -m moe_morpheus.upcycle.sweep 'extra_fractions=[0.012]' "tracking_uri=$STORE" \
      output_dir=multirun/upcycle_vs_scratch || status=$?
  else
    "$PY" train.py -m "+sweeps=$sweep" "tracking.uri=$STORE" || status=$?
  fi
  "$PY" -m moe_morpheus.tracking.snapshot "$WORKING" studies/mlflow.db || status=$?
  if [ "$(report_state "$sweep")" = current ]; then
    echo "run_studies: reports/$sweep names every finished run of $sweep; kept"
  else
    "$PY" -m moe_morpheus.report experiment=moe_morpheus "sweep=$sweep" "tracking_uri=$STORE" "out=reports/$sweep" || status=$?
  fi
done
exit "$status"
