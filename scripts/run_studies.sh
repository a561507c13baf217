#!/usr/bin/env bash
# The committed studies (reports/study_moe_vs_dense, reports/scaling_ladder), in order, each
# followed by its report. Runs log to the working store studies/runs.db (not committed); after
# each sweep its snapshot, studies/mlflow.db (python -m moe_morpheus.tracking.snapshot: every
# run and evaluation, step metrics thinned), is rewritten: commit that file as runs finish. On a
# fresh clone the working store starts as a copy of the snapshot, so this script skips the jobs
# that finished anywhere (by their FINISHED runs) and resumes the others from their checkpoints
# where the multirun/ folder is still there, from scratch where it is not.
# About 1.5 hours with THREADS=2 on an otherwise idle 2-core machine for study 1, 2.6 for the
# ladder (the plans are in the conf/sweeps/ files). THREADS (default 1) is the PyTorch threads per
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
status=0
for sweep in ${STUDIES:-study_moe_vs_dense scaling_ladder}; do
  # A failed job stops its sweep; the report still shows what finished (and lists the failure),
  # and the next study still runs. The exit status says whether everything finished.
  "$PY" train.py -m "+sweeps=$sweep" "tracking.uri=$STORE" || status=$?
  "$PY" -m moe_morpheus.tracking.snapshot "$WORKING" studies/mlflow.db || status=$?
  "$PY" -m moe_morpheus.report experiment=moe_morpheus "sweep=$sweep" "tracking_uri=$STORE" "out=reports/$sweep" || status=$?
done
exit "$status"
