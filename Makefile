# vlmops — two commands do all the set-up on a fresh machine:
#   make run    creates .venv, installs the pinned dependencies, runs the retrain flow on pipeline.yaml
#   make test   the same set-up, then ruff, mypy and pytest
# `make test` also installs Debian's chromium for the browser tests when it is missing (as root, e.g. in CI).
# Set-up is done once (it reruns when pyproject.toml or requirements/lock.txt change).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU machines get the CPU build of torch 2.13.0 (from the local wheel where there is one); a machine with
# an NVIDIA driver keeps the CUDA build pip picks.
TORCH  ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'torch>=2.11' || echo 'torch==2.13.0')
# GPU machines also get the `gpu` extra (Liger Kernel's fused loss for fast training).
EXTRAS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo 'dev,gpu' || echo 'dev')
CONFIG ?= pipeline.yaml
ARGS   ?=
PYTEST_ARGS ?=

# Offline, quiet tools: the embedded default needs no hub, and nothing should phone home.
export DVC_NO_ANALYTICS := 1
export DO_NOT_TRACK := 1
export MLFLOW_DISABLE_TELEMETRY := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false
export GRADIO_ANALYTICS_ENABLED := False

.PHONY: setup chromium run test lint typecheck unit clean

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

setup: $(VENV)/.installed

run: setup
	HF_HUB_OFFLINE=1 $(BIN)/vlmops run --config $(CONFIG) $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

test: chromium lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

unit: setup
	$(BIN)/pytest -m "not integration and not e2e and not browser" $(PYTEST_ARGS)

clean:
	rm -rf outputs .pytest_cache .mypy_cache .ruff_cache
