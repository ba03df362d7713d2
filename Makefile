# fedseq: the two commands of the README, and the pieces they are made of.
#   make run    set up (once) and run the main job: a networked federation on synthetic data
#   make test   set up (once) and run every check: stale proto stubs, lint, the full test suite

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch is installed first and pinned, so pip never pulls a multi-GB CUDA build by accident
TORCH  ?= torch==2.13.0
RUN_ARGS ?=

.PHONY: setup run sim test test-fast lint protos check-protos bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/fedseq sweep mission $(RUN_ARGS)

sim: setup
	$(BIN)/fedseq sim $(RUN_ARGS)

check-protos: setup
	$(BIN)/python tools/gen_protos.py --check

protos: setup
	$(BIN)/python tools/gen_protos.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy fedseq server client attacker orchestrator cli

test: check-protos lint
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python bench/bench_epoch.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
