# Set-up is idempotent: the venv is rebuilt only when pyproject.toml changes.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
# The CPU build of torch 2.13.0 (+cpu), never PyPI's plain Linux wheel (a multi-GB CUDA build):
# first from pip's configured sources (a local wheel, where there is one), else from PyTorch's
# CPU index; macOS has no +cpu wheel and its plain wheel is a CPU build.
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

.PHONY: setup check test test-fast bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0+cpu" || \
	  $(BIN)/python -m pip install -q "torch==2.13.0+cpu" --index-url $(TORCH_CPU_INDEX) || \
	  { test "$$(uname)" = Darwin && $(BIN)/python -m pip install -q "torch==2.13.0"; }
	$(BIN)/python -m pip install -q -e ".[cpu,gpu,test]"
	touch $(STAMP)

check: setup
	$(BIN)/mhc-multi backends
	$(BIN)/mhc-multi check

test: setup
	$(BIN)/python -m pytest -q tests

# the edit-run loop: everything but the slow and the Triton-interpreter tests (conftest.py)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not interpreter" tests

bench: setup
	$(BIN)/python bench/bench.py

clean:
	rm -rf $(VENV)
