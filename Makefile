# fedseq: the two commands of the README, and the pieces they are made of.
#   make run    set up (once) and run the main job: a networked federation on synthetic data
#   make test   set up (once) and run every check: stale proto stubs, lint, the full test suite

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Every dependency comes pinned from requirements-dev.lock (compiled from pyproject.toml and
# requirements.in by `make lock`), torch included: 2.13.0+cpu, so pip never pulls a multi-GB CUDA
# build. Each pin carries the sha256 of its files, and pip installs with --require-hashes: a file
# that differs from the one locked fails the install. The fedseq machines find the torch wheel in
# /opt/wheels (pip's find-links); elsewhere add the CPU wheel index:
#   make setup PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_ARGS ?=
RUN_ARGS ?=
# Python may write its bytecode caches (__pycache__/, git-ignored) even where the environment says
# not to (PYTHONDONTWRITEBYTECODE=1 on the fedseq machines): the suite starts some 40 interpreters,
# and each compiled every module of the project again (a collection took 7.4 s instead of 3.4 s)
export PYTHONDONTWRITEBYTECODE :=

.PHONY: setup lock run sim test test-fast lint protos check-protos bench clean

setup: $(VENV)/.installed

# --no-compile: pip would byte-compile every module of every package (45 s of a 47 s install here);
# the import after it compiles what fedseq, its services and its tests load (about 10 s), and the
# rest compiles when first imported
WARM_IMPORTS = torch torch._dynamo numpy grpc grpc_health grpc_reflection safetensors redis yaml \
	cryptography prometheus_client psutil matplotlib.pyplot pytest xdist hypothesis kubernetes_validate mlflow.tracking \
	cli.main cli.services cli.sim cli.sweep server.app client.app attacker.app orchestrator.app fedseq.experiment

$(VENV)/.installed: pyproject.toml requirements-dev.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q --no-compile --require-hashes --no-deps $(PIP_ARGS) -r requirements-dev.lock
# the project itself, editable: no file to hash; --no-deps, so it installs nothing unhashed
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	$(BIN)/python -c "import importlib; [importlib.import_module(m) for m in '$(WARM_IMPORTS)'.split()]"
# Ray's nodes (tests/test_sweep_ray.py) are a dozen processes that import some 600 of its modules:
# compiled here at once (3 s on two cores) instead of by each of them, uncached, in the suite
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import importlib.util as u; print(u.find_spec("ray").submodule_search_locations[0])')" > /dev/null
# The install leaves about 1.6 GB of the venv to be written back to disk; the kernel did so while the
# suite ran, and a fresh clone's first `make test-fast` took 57.3 s against 49.9 s after a `sync`
# (0.9 s here; docs/results/suite.md)
	sync
	touch $@

# Re-pin after changing pyproject.toml or requirements.in (needs PyPI; pip-tools goes into its own
# venv). --generate-hashes writes the sha256 of every file of each pinned version; pins already in
# the lock files stay (pip-compile keeps them unless told --upgrade). The torch hash comes from
# where the CPU wheel is found: /opt/wheels on the fedseq machines (that wheel's hash), else the
# CPU wheel index (the hashes of all its platforms). Override with LOCK_ARGS.
LOCK_ARGS ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
PIP_COMPILE = $(VENV)-lock/bin/pip-compile -q --strip-extras --allow-unsafe --generate-hashes --no-emit-find-links --no-emit-index-url
lock:
	test -x $(VENV)-lock/bin/pip-compile || { $(PYTHON) -m venv $(VENV)-lock && $(VENV)-lock/bin/pip install -q "pip-tools==7.6.2"; }
	$(PIP_COMPILE) $(LOCK_ARGS) $(PIP_ARGS) -o requirements.lock pyproject.toml requirements.in
	$(PIP_COMPILE) $(LOCK_ARGS) $(PIP_ARGS) --extra dev -o requirements-dev.lock pyproject.toml requirements.in
	$(PIP_COMPILE) $(LOCK_ARGS) $(PIP_ARGS) --extra ray -o requirements-ray.lock pyproject.toml requirements.in

run: setup
	$(BIN)/fedseq sweep mission $(RUN_ARGS)

sim: setup
	$(BIN)/fedseq sim $(RUN_ARGS)

check-protos: setup
	$(BIN)/python tools/gen_protos.py --check

protos: setup
	$(BIN)/python tools/gen_protos.py

TYPED = fedseq server client attacker orchestrator cli

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy $(TYPED)

# The suite runs in TEST_WORKERS processes (pytest-xdist; auto: one per CPU), each test file on one
# of them (--dist loadfile: a file's module fixtures, e.g. tests/test_insider.py's federations, are
# built once), the longest files first (tests/conftest.py FILE_SECONDS; --no-loadscope-reorder
# keeps that order instead of xdist's most-tests-first), one torch thread per process (two xdist
# workers at two threads each on two cores only contend: docs/results/suite.md).
# TEST_WORKERS=0 runs it in this process. Tests marked `alone` (claims about a service under an
# insider's load) run after that, in one process, with only mypy beside them (about 20 CPU s
# from a fresh clone, where it has no cache; one core: the starved server's rounds take 0.1-0.2 s
# against the 5 s the claim allows); either one failing fails `make test`.
TEST_WORKERS ?= auto
PYTEST_ON = OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q --dist loadfile --no-loadscope-reorder -n
PYTEST = $(PYTEST_ON) $(TEST_WORKERS)
# the files that hold `alone` tests (collecting only them saves the whole suite's second collection)
ALONE_FILES = $(shell grep -l '@pytest.mark.alone' tests/test_*.py)

test: check-protos
	$(BIN)/ruff check .
	$(PYTEST) -m "not alone"
	{ $(BIN)/mypy $(TYPED) > $(VENV)/mypy.out 2>&1; echo $$? > $(VENV)/mypy.rc; } & \
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -m alone $(ALONE_FILES); rc=$$?; wait; cat $(VENV)/mypy.out; \
	[ $$rc -eq 0 ] && [ "$$(cat $(VENV)/mypy.rc)" = 0 ]

# test-fast's tests wait on sockets and sleeps for a third of their time: one worker more than
# the CPUs keeps both busy (58-60 s against 65-67 s with two on the 2-core machine)
FAST_WORKERS ?= $(shell $(PYTHON) -c "import os; print((os.cpu_count() or 1) + 1)")
test-fast: setup
	$(PYTEST_ON) $(FAST_WORKERS) -m "not slow and not alone"

bench: setup
	$(BIN)/python bench/bench_epoch.py

clean:
	rm -rf $(VENV) $(VENV)-lock .pytest_cache .ruff_cache .mypy_cache
