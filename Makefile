PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/quickstart.yaml
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test install install-test bench check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	@mkdir -p .gateway
	$(BIN)/gateway serve --config $(CONFIG) --host $(HOST) --port $(PORT)

check: install
	$(BIN)/gateway check --config $(CONFIG)

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .gateway
