# The README's two commands, each one step from a fresh clone.
#   make up     the local Kafka and rtcbus's topics
#   make test   every test; integration tests on a real broker (see tests/conftest.py)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: up test

# For now the local Kafka and the topics; it becomes `rtcbus up` with the pipeline.
up: $(BIN)/rtcbus
	$(BIN)/rtcbus kafka start && $(BIN)/rtcbus topics create

test: $(BIN)/rtcbus
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The virtualenv, installed again whenever pyproject.toml changes.
$(BIN)/rtcbus: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[dev]'
	touch $@
