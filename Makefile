# The README's two commands, each one step from a fresh clone.
#   make up     everything on the embedded default: local Kafka, topics, shim, router
#   make test   every test; integration tests on a real broker (see tests/conftest.py)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: up test

up: $(BIN)/rtcbus
	$(BIN)/rtcbus up

test: $(BIN)/rtcbus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The virtualenv, installed again whenever pyproject.toml changes.
$(BIN)/rtcbus: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@
