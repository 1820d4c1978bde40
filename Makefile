# The two commands of the README: `make demo` and `make test` (lint, types, tests). Each creates
# the virtual environment on first use (torch and torchvision are pinned in pyproject.toml).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The demo needs only the runtime dependencies; the tests' tools (Ray among them) come with `test`.
RUNTIME := $(VENV)/.runtime
# TensorRT's type stubs, for mypy only. The oldest release of the stubs: nearest the TensorRT 10.3
# of JetPack 6, so an API newer than the boards have is less likely to pass the check.
# Installed with --no-deps: they require tensorrt itself, whose installer cannot run without
# NVIDIA's index (and which would be of no use without a GPU).
TRT_STUBS := tensorrt-stubs==10.8.0.43.1

.PHONY: demo test lint format clean

$(RUNTIME): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# --no-compile: byte-compiling every installed module (torch's thousands) took 25 s of a 75 s
	# install; Python compiles the few it imports on first use instead.
	$(BIN)/python -m pip install --quiet --no-compile -e .
	touch $(RUNTIME)

$(STAMP): $(RUNTIME) tests/fix_tensorrt_stubs.py
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps $(TRT_STUBS)
	$(BIN)/python tests/fix_tensorrt_stubs.py
	touch $(STAMP)

# The demo searches 24 candidates instead of the default 40, to finish within minutes on 2 cores.
demo: $(RUNTIME)
	$(BIN)/pipeline run --target profiles/cpu.yaml --episodes 24

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports
	$(BIN)/mypy
	$(BIN)/pytest -q -n 2 --dist loadgroup

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
