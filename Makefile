# vlmops — two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs the pinned dependencies, runs the retrain flow on pipeline.yaml
#   make test   the same set-up, then ruff, mypy and pytest (with a GPU: the CPU tests with CUDA hidden, then -m gpu)
# `make test` also installs Debian's chromium (browser tests) and postgresql-15 (the team stack's tests) when
# they are missing and make runs as root, e.g. in CI. Team mode: make stack-up / stack-status / stack-down.
# Set-up is done once (it reruns when pyproject.toml or requirements/lock.txt change).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Machines without an NVIDIA driver get torch 2.13.0: the CPU build where pip finds one (a local wheel in its
# find-links), else PyPI's default build, which runs on the CPU too; a machine with a driver keeps the CUDA build
# pip picks.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')
# GPU machines also get the `gpu` extra (Liger Kernel's fused loss for fast training).
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'dev,gpu' || echo 'dev')
CONFIG ?= pipeline.yaml
ARGS   ?=
PYTEST_ARGS ?=
# `make test` and `make unit` run pytest on this many workers (pytest-xdist), a test module per worker at a time
# (tests/conftest.py: the team stack's modules are one unit, the longest start first). The suite waits on servers
# and subprocesses much of the time: two workers on two cores take about two thirds of a serial run's time.
# PYTEST_WORKERS=0 runs it serially in one process.
PYTEST_WORKERS ?= 2
XDIST  := -n $(PYTEST_WORKERS) --dist loadscope --no-loadscope-reorder

# Offline, quiet tools: the embedded default needs no hub, and nothing should phone home.
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup chromium postgres run test test-team lint typecheck unit clean stack-up stack-status stack-env stack-down

$(VENV)/.installed: pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet '$(TORCH)'
	$(BIN)/python -m pip install --quiet -c requirements/lock.txt -e '.[$(EXTRAS)]'
	# DeepSpeed ships only as source; its build imports torch, so build it against the torch just installed.
	# DS_BUILD_OPS=0: kernels (CPU Adam, ...) compile on first use on the GPU machine, not here.
	DS_BUILD_OPS=0 $(BIN)/python -m pip install --quiet --no-build-isolation -c requirements/lock.txt deepspeed
	touch $@

# The browser tests drive Debian's chromium (Playwright's own browser download needs a network CI lacks).
# Installed once when missing and make runs as root (CI); elsewhere a note, and those tests skip.
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; \
	  else \
	    echo "chromium not found: the browser tests will be skipped (Debian: sudo apt-get install chromium)"; \
	  fi; }

# The team stack (infra/local) runs Debian's PostgreSQL 15; installed once when missing and make runs as root.
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get update -qq >/dev/null && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 >/dev/null; \
	  else \
	    echo "PostgreSQL 15 not found: the team tests will fail (Debian: sudo apt-get install postgresql-15)"; \
	  fi; }

setup: $(VENV)/.installed

# Team mode on this machine: PostgreSQL, SeaweedFS (S3), MLflow and Prefect servers and a worker on pool `gpu`
# (infra/local/stack.py; credentials and ports from .env, see .env.example; data under .stack/).
stack-up: setup postgres
	$(BIN)/python -m infra.local.stack up

stack-status: setup
	@$(BIN)/python -m infra.local.stack status

# The client settings as export lines: eval "$$(make -s stack-env)"
stack-env: setup
	@$(BIN)/python -m infra.local.stack env

stack-down: setup
	$(BIN)/python -m infra.local.stack down

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/vlmops run --config $(CONFIG) $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

# On a machine with an NVIDIA GPU the suite runs in two parts: everything but the `gpu` tests with CUDA hidden
# (CUDA_VISIBLE_DEVICES empty, inherited by every process a test starts), so those tests take the CPU path they were
# written and pinned for, as in CI; then the `gpu` tests, with the GPU. Elsewhere one run (the `gpu` tests skip).
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 1)

test: chromium postgres lint typecheck
ifeq ($(HAS_GPU),1)
	CUDA_VISIBLE_DEVICES= $(BIN)/pytest $(XDIST) -m "not gpu" $(PYTEST_ARGS)
	$(BIN)/pytest -m gpu $(PYTEST_ARGS)
else
	$(BIN)/pytest $(XDIST) $(PYTEST_ARGS)
endif

# The team-mode integration tests alone: the whole stack natively, deploy, retrain, retry, promote, batch job, and a
# run whose worker was lost, marked Crashed by the server and retried.
test-team: setup postgres
	$(BIN)/pytest -m team $(PYTEST_ARGS)

unit: setup
	$(if $(HAS_GPU),CUDA_VISIBLE_DEVICES= )$(BIN)/pytest $(XDIST) -m "not integration and not e2e and not browser and not team and not gpu" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
