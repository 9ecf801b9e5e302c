# The two quick-start commands: `make demo` (main job) and `make test`. Both create or reuse .venv,
# pinned to the development environment's torch (constraints.txt; the library takes ranges).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.gradfilter-installed

.PHONY: demo test test-all test-arm lint bench

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradfilter demo

test: $(STAMP)
	$(PY) -m pytest

test-all: $(STAMP)
	$(PY) -m pytest -m ''

# The tests on an emulated aarch64 board (root; caches under ~/.cache/gradfilter/arm64; docs/arm.md).
# Narrow it with ARM_CPUS=cortex-a76 ARM_TESTS="tests/test_native.py -k bn" (make passes both on).
test-arm:
	tools/arm/test_arm.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks

bench: $(STAMP)
	$(VENV)/bin/gradfilter bench layers --out benchmarks/results/layers_cpu.json
