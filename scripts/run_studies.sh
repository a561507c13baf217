#!/usr/bin/env bash
# The committed studies of reports/study_moe_vs_dense and reports/scaling_ladder, in order, then
# their reports. Resumable: every sweep has one folder (multirun/<sweep>), so running this again
# skips finished jobs and resumes the others from their checkpoints, in their MLflow runs.
# About 7.5 hours on one core, 4.5-5 with THREADS=2 on an otherwise idle 2-core machine (the plans
# are in conf/sweeps/study_moe_vs_dense.yaml and scaling_ladder.yaml). THREADS (default 1) is the PyTorch threads per run: one leaves a core of
# a 2-core machine free; 2 processes of 2 threads each on 2 cores are several times slower than
# one, so do not run two of these at once.
#   scripts/run_studies.sh            # or: nohup scripts/run_studies.sh > studies.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
PY=.venv/bin/python
status=0
for sweep in study_moe_vs_dense scaling_ladder; do
  # A failed job stops its sweep; the report still shows what finished (and lists the failure),
  # and the next study still runs. The exit status says whether everything finished.
  "$PY" train.py -m "+sweeps=$sweep" || status=$?
  "$PY" -m moe_morpheus.report experiment=moe_morpheus "sweep=$sweep" "out=reports/$sweep" || status=$?
done
exit "$status"
