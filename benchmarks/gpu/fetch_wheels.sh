#!/usr/bin/env bash
# Run here (a machine with the package registry): puts into .whl/ the cp312 wheels the GPU machine
# lacks (it has Python 3.12, its own CUDA torch, numpy, einops, sentencepiece, psutil, tqdm, pyyaml,
# packaging, but no registry). antlr4-python3-runtime (omegaconf's parser) ships no wheel on PyPI:
# it is pure Python, so it is built here.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    megatron-core==0.16.1 hydra-core==1.3.8 omegaconf==2.3.1
"$PY" -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
