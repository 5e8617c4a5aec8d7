# The README's commands. `make demo` and `make test` each do the whole set-up first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.tenantml-installed

.PHONY: setup horovod demo test test-fast lint bench clean

setup: $(STAMP)

# Python deps from the package registry, then the Delta Lake jars resolved once into the Ivy cache
# (Spark fetches them from Maven Central by coordinates; nothing is copied by hand).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m tenantml.sparksession
	touch $(STAMP)

# Opt-in, not part of setup: compiles Horovod 0.28.1 from source (CPU, Gloo, PyTorch only); ~3 min on 2 cores.
horovod: setup
	VENV=$(VENV) bash .ci/build-horovod.sh

demo: setup
	$(VENV)/bin/tenantml demo

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not slow"

lint: setup
	$(VENV)/bin/ruff check libs tests bench jobs
	$(VENV)/bin/mypy

bench: setup
	$(PY) bench/bench_tenant_models.py

clean:
	rm -rf .data .pytest_cache .mypy_cache .ruff_cache
