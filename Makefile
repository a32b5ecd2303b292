# `make demo` and `make test` are all a newcomer needs; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flowsort-installed
# Pinned: an unpinned torch resolves to the multi-GB CUDA build.
TORCH := torch==2.13.0
DEMO_DIR ?= demo-output
DEMO_ARGS ?=

.PHONY: setup test demo clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e ".[cpu,train,dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest

demo: $(STAMP)
	$(BIN)/flowsort demo --out $(DEMO_DIR) $(DEMO_ARGS)

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
