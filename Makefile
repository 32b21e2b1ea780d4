# Fresh-machine entry points: `make demo` and `make test`. Everything installs into .venv.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test bench-cpu bench-gpu gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# the CPU wheel: a plain `torch` requirement would pull a multi-GB CUDA build. Where the configured index
	# gives a CUDA build for this pin (plain PyPI on Linux x86_64): make TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
	$(BIN)/pip install -q torch==2.13.0 $(TORCH_PIP_ARGS)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m nsa.cli demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

bench-cpu: $(STAMP)
	$(BIN)/python benchmarks/cpu_suite.py

bench-gpu:
	bash benchmarks/run_gpu_suite.sh

# one call of ~10 minutes (~8 with SKIP_TRAIN=1): the GPU suite, decode, profile, generate, the Triton tests on the GPU
gpu-check:
	bash benchmarks/run_gpu_all.sh

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
