# `make train`, `make test` and `make test-fast` set everything up on first use: a .venv with the pinned
# dependencies (re-installed only when pyproject.toml changes), then the demo job or the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-fast lint clean-venv mlflow-server

# The slurm extra (hydra-submitit-launcher) too: tests/cluster/ submit through it when a Slurm
# answers (.ci/run brings one up) and skip otherwise.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,slurm]'
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py +experiment=moe_64e

# Two pytest workers (pytest-xdist), one test file per worker at a time (--dist loadfile keeps a
# file's module fixtures, e.g. the reference runs of tests/train/test_checkpoint_resume.py, in one
# worker). Most of the suite's time is single-threaded (process start-up, imports, data planning),
# so two workers fill the two cores of the CI machine.
test: $(STAMP)
	$(PY) -m ruff check moe_morpheus tests benchmarks train.py
	$(PY) -m pytest -q -n 2 --dist loadfile tests

# The edit loop: ruff and the in-process unit tests; tests marked slow (they spawn processes) are left out.
test-fast: $(STAMP)
	$(PY) -m ruff check moe_morpheus tests benchmarks train.py
	$(PY) -m pytest -q -m "not slow" tests

# An MLflow tracking server on 127.0.0.1:5000 (runs in mlflow_server/mlflow.db, artifacts beside them);
# train with tracking.uri=http://127.0.0.1:5000. Options (HOST, PORT, AUTH=1): scripts/mlflow_server.sh.
mlflow-server: $(STAMP)
	scripts/mlflow_server.sh mlflow_server

lint: $(STAMP)
	$(PY) -m ruff check --fix moe_morpheus tests benchmarks train.py

clean-venv:
	rm -rf $(VENV)
