# `make train`, `make test` and `make test-fast` set everything up on first use: a .venv with the pinned
# dependencies (re-installed only when pyproject.toml changes), then the demo job or the tests.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: train test test-fast lint clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

train: $(STAMP)
	$(PY) train.py +experiment=moe_64e

test: $(STAMP)
	$(PY) -m ruff check moe_morpheus tests benchmarks train.py
	$(PY) -m pytest -q tests

# The edit loop: ruff and the in-process unit tests; tests marked slow (they spawn processes) are left out.
test-fast: $(STAMP)
	$(PY) -m ruff check moe_morpheus tests benchmarks train.py
	$(PY) -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(PY) -m ruff check --fix moe_morpheus tests benchmarks train.py

clean-venv:
	rm -rf $(VENV)
