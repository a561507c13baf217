#!/usr/bin/env bash
# On the GPU machine, from the repository root, with .whl/ carried along (benchmarks/gpu/fetch_wheels.sh):
# installs the wheels beside the machine's own torch, then runs the GPU checks and benchmarks.
#   bash benchmarks/gpu/run.sh            # results under benchmarks/results/ (and $OUT when set)
set -uo pipefail
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py
python3 benchmarks/train_step.py --gpu --rounds 1 --steps 5
python3 benchmarks/gpu/moe_layer_gpu.py
if [ -n "${OUT:-}" ]; then cp benchmarks/results/*.json "$OUT"/ 2>/dev/null; fi
