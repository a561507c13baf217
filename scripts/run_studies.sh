#!/usr/bin/env bash
# The committed studies of reports/study_moe_vs_dense, reports/study_moe_ablation and
# reports/scaling_ladder, in order, each followed by its report. Resumable: every sweep has one
# folder (multirun/<sweep>), so running this again skips finished jobs and resumes the others from their checkpoints, in their MLflow runs.
# About 9 hours on one core, 5.5-6 with THREADS=2 on an otherwise idle 2-core machine (the plans
# are in the three conf/sweeps/ files). THREADS (default 1) is the PyTorch threads per run: one
# leaves a core of a 2-core machine free; 2 processes of 2 threads each on 2 cores are several times slower than
# one, so do not run two of these at once.
#   scripts/run_studies.sh            # or: nohup scripts/run_studies.sh > studies.log 2>&1 &
set -uo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${THREADS:-1}"
PY=.venv/bin/python
status=0
for sweep in study_moe_vs_dense study_moe_ablation scaling_ladder; do
  # A failed job stops its sweep; the report still shows what finished (and lists the failure),
  # and the next study still runs. The exit status says whether everything finished.
  "$PY" train.py -m "+sweeps=$sweep" || status=$?
  "$PY" -m moe_morpheus.report experiment=moe_morpheus "sweep=$sweep" "out=reports/$sweep" || status=$?
done
exit "$status"
