PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= deploy/quickstart.yaml
HOST ?= 127.0.0.1
PORT ?= 8080

.PHONY: run test install install-test install-local bench check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/pip install -q -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -q -c requirements.lock -e '.[test]'
	touch $@

# The local model runtime (llama-cpp-python compiled once, then from pip's wheel cache) and
# the SmolLM2-135M model file: scripts/install_local.sh says which and how long.
$(VENV)/.installed-local: $(VENV)/.installed scripts/install_local.sh
	bash scripts/install_local.sh $(BIN)
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-local: $(VENV)/.installed-local

# A local model server (llama.cpp + SmolLM2 on 127.0.0.1:8081) and the gateway in front of it;
# prints a ready-to-paste snippet with a tenant key. Ctrl-C stops both.
run: install install-local
	$(BIN)/python scripts/run_local.py --config $(CONFIG) --host $(HOST) --port $(PORT)

check: install
	$(BIN)/gateway check --config $(CONFIG)

test: install-test install-local
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: install-test
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .gateway
