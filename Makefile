# The README's commands. `make demo` and `make test` each do the whole set-up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tenantml-installed

.PHONY: setup horovod browser demo test test-all test-fast lint bench clean

setup: $(STAMP)

# Python deps from the package registry (`local`: PySpark and delta-spark, which a Databricks runtime
# provides itself), then the Delta Lake jars resolved once into the Ivy cache (Spark fetches them
# from Maven Central by coordinates; nothing is copied by hand).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev,local]'
	$(PY) -m tenantml.apps.setup
	touch $(STAMP)

# Opt-in, not part of setup: compiles Horovod 0.28.1 from source (CPU, Gloo, PyTorch only); ~3 min on 2 cores.
horovod: setup
	VENV=$(VENV) bash .ci/build-horovod.sh

# Headless Chromium for the run-report test (Debian's package, via apt-get: root, or sudo when there is
# one). Idempotent: nothing to do when /usr/bin/chromium exists. Not part of setup; CI runs it.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

browser:
	@if [ -x /usr/bin/chromium ]; then \
	  echo "$$(/usr/bin/chromium --version 2>/dev/null) already installed"; \
	else \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core && \
	  /usr/bin/chromium --version; \
	fi

demo: setup
	$(VENV)/bin/tenantml demo

# Two workers; tests that share a built world run on the same one (tests/conftest.py). `test` is
# what CI runs; `test-all` adds the heavy tier (listed in tests/conftest.py, HEAVY_MODULES).
test: setup
	$(PY) -m pytest -n 2 -m "not heavy"

test-all: setup
	$(PY) -m pytest -n 2

test-fast: setup
	$(PY) -m pytest -n 2 -m "not slow and not heavy"

lint: setup
	$(VENV)/bin/ruff check libs tests bench jobs
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/bench_tenant_models.py

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
