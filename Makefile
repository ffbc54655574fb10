# Shortcuts for developers and CI. `make run` and `make test` are the two that matter.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv run test services lint format migrate bench

## venv: create .venv and install the project with its dev tools (again when pyproject changes)
venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: the whole gateway in one process (memory storage, fakeredis), no services needed
run: venv
	$(BIN)/gateway dev

## test: the whole suite against the local PostgreSQL and Redis (started when down)
test: venv
	bash .ci/services
	$(BIN)/pytest -q -n auto --maxprocesses 8 $(PYTEST_ARGS)

## services: make sure the local PostgreSQL and Redis are up
services:
	bash .ci/services

## lint: what CI checks besides the tests
lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## format: rewrite the code in the house style
format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## migrate: upgrade the database at DATABASE_URL to the latest schema
migrate: venv
	$(BIN)/gateway migrate

## bench: run every benchmark script in bench/
bench: venv
	@test -d bench || { echo "bench/ holds no benchmarks yet" >&2; exit 1; }
	@for script in bench/[!_]*.py; do \
		echo "== $$script"; $(BIN)/python "$$script" || exit 1; \
	done
