# fleetflow: `make up` runs the platform, `make test` runs every check.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: install up test lint typecheck unit bench record-histories clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

up: install
	$(BIN)/fleetflow up $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy .

test: lint typecheck
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -q tests/unit

record-histories: install
	$(BIN)/python -m tests.replay.record $(SCENARIOS)

bench: install
	$(BIN)/python -m bench.onboarding

clean:
	rm -rf $(VENV) .fleetflow .mypy_cache .ruff_cache .pytest_cache
