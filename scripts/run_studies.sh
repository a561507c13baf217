#!/usr/bin/env bash
# The committed studies (reports/study_moe_vs_dense, reports/scaling_ladder,
# reports/upcycle_vs_scratch), in order, each followed by its report. Runs log to the working store studies/runs.db (not committed); after
# each sweep its snapshot, studies/mlflow.db (python -m moe_morpheus.tracking.snapshot: every
# run and evaluation, step metrics thinned), is rewritten: commit that file as runs finish. On a
# fresh clone the working store starts as a copy of the snapshot, so this script skips the jobs
# that finished anywhere (by their FINISHED runs) and resumes the others from their checkpoints
# where the multirun/ folder is still there, from scratch where it is not.
# About 1.5 hours with THREADS=2 on an otherwise idle 2-core machine for study 1, 2.6 for the
# ladder (the plans are in the conf/sweeps/ files), 1 for the upcycling sweep. The upcycling
# sweep's later stages start from its dense stages' checkpoints, which live in multirun/ only:
# it must run start to finish on one machine (its driver stops with the fix where it cannot). THREADS (default 1) is the PyTorch threads per
# run: one leaves a core of a 2-core machine free; two processes of 2 threads each on 2 cores are
# several times slower than one, so do not run two of these at once.
# STUDIES overrides the list, e.g. STUDIES=study_moe_ablation for the diagnostic ablation.
#   scripts/run_studies.sh            # or: nohup scripts/run_studies.sh > studies.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
PY=.venv/bin/python
WORKING=studies/runs.db
[ -f "$WORKING" ] || cp studies/mlflow.db "$WORKING"
STORE="sqlite:///$WORKING"
# The finished training runs of a sweep (count and latest end): the report is rewritten only when
# they changed, so a rerun that skips every job keeps the committed report as it is (the runs of
# studies logged before snapshots carried artifacts have no expert-load data in the store).
finished_runs() {
  "$PY" -c 'import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
print(*db.execute("SELECT COUNT(*), MAX(r.end_time) FROM runs r JOIN tags t ON t.run_uuid = r.run_uuid "
                  "JOIN latest_metrics m ON m.run_uuid = r.run_uuid WHERE t.key = ? AND t.value = ? "
                  "AND m.key = ? AND r.status = ?", ("sweep", sys.argv[2], "final/valid_loss", "FINISHED")).fetchone())' \
    "$WORKING" "$1"
}
status=0
for sweep in ${STUDIES:-study_moe_vs_dense scaling_ladder upcycle_vs_scratch}; do
  # A failed job stops its sweep; the report still shows what finished (and lists the failure),
  # and the next study still runs. The exit status says whether everything finished.
  before=$(finished_runs "$sweep")
  if [ "$sweep" = upcycle_vs_scratch ]; then
    # The +100% extra budget only (reports/upcycle_vs_scratch/CONCLUSION.md): 15 runs.
    "$PY" -m moe_morpheus.upcycle.sweep 'extra_fractions=[0.012]' "tracking_uri=$STORE" \
      output_dir=multirun/upcycle_vs_scratch || status=$?
  else
    "$PY" train.py -m "+sweeps=$sweep" "tracking.uri=$STORE" || status=$?
  fi
  "$PY" -m moe_morpheus.tracking.snapshot "$WORKING" studies/mlflow.db || status=$?
  if [ "$(finished_runs "$sweep")" = "$before" ] && [ -f "reports/$sweep/report.md" ]; then
    echo "run_studies: $sweep has no newly finished run; reports/$sweep kept"
  else
    "$PY" -m moe_morpheus.report experiment=moe_morpheus "sweep=$sweep" "tracking_uri=$STORE" "out=reports/$sweep" || status=$?
  fi
done
exit "$status"
