# Shortcuts for developers and CI. `make run` and `make test` are the two that matter.
#
# Every target installs from uv.lock, so a fresh clone runs exactly the versions that were tested.
# uv itself is a pinned release, put in .tools/ from PyPI the first time (or pass UV=/path/to/uv).

PYTHON ?= python3.11
UV_VERSION := 0.13.9
TOOLS := .tools
UV ?= $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

# uv uses this interpreter for .venv and never downloads one of its own.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never

.PHONY: venv lock run test services lint format migrate bench

$(TOOLS)/bin/uv:
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet 'uv==$(UV_VERSION)'

## venv: make .venv hold exactly what uv.lock says: the project, editable, and its dev tools
# --locked also fails when pyproject.toml has changed without `make lock`.
venv: $(UV)
	$(UV) sync --locked --quiet

## lock: upgrade every dependency to its newest allowed release (then run the tests, commit uv.lock)
lock: $(UV)
	$(UV) lock --upgrade
	$(UV) sync --locked

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
	$(BIN)/lint-imports --no-logo

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
