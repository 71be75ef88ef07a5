# The README's two commands, each one step from a fresh clone.
#   make up     everything on the embedded default: local Kafka, topics, shim, router
#   make test   every test, in two processes; integration tests on a real broker (see tests/conftest.py)
#   make bench  the quick benchmark suite (bench/README.md); BENCH_ARGS=--full for the long one

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=
# Two pytest-xdist workers, a test file each at a time: the fault suite (collected first, see
# tests/conftest.py) on one, every other file beside it. PYTEST_WORKERS=0 runs in one process.
PYTEST_WORKERS ?= 2
BENCH_ARGS ?=
QUIX_VENV ?= .venv-quix

.PHONY: up test bench

up: $(BIN)/rtcbus
	$(BIN)/rtcbus up

test: $(BIN)/rtcbus
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

bench: $(BIN)/rtcbus $(QUIX_VENV)/.installed
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev,bench]'
	# oha, the shim section's load generator: built once (minutes), cached after; without
	# cargo the section says "not installed".
	-sh bench/tools.sh >/dev/null
	$(BIN)/python -m bench $(BENCH_ARGS)

# Quix Streams, for the benchmark only, in a virtualenv of its own: it pins confluent-kafka
# and pydantic below the versions rtcbus runs with.
$(QUIX_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(QUIX_VENV)
	$(QUIX_VENV)/bin/pip install --quiet --disable-pip-version-check -e . quixstreams
	touch $@

# The virtualenv, installed again whenever pyproject.toml changes.
$(BIN)/rtcbus: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@
