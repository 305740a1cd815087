# sisa — exact machine unlearning by SISA training.
# `make demo` and `make test` work on a fresh machine: each creates .venv and installs what it needs.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch is pinned to the CPU wheel; installing it first keeps pip from pulling a multi-GB CUDA build.
TORCH  := torch==2.13.0

.PHONY: install data demo test test-all lint format bench gpu-check clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[dev,serve,cluster,report]" $(TORCH)
	touch $@

data: install
	$(PY) scripts/make_data.py adult mnist --out data

demo: data
	$(PY) scripts/demo.py

test: install
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m "" 

lint: install
	$(VENV)/bin/ruff check sisa scripts tests
	$(VENV)/bin/ruff format --check sisa scripts tests

format: install
	$(VENV)/bin/ruff format sisa scripts tests
	$(VENV)/bin/ruff check --fix sisa scripts tests

bench: install
	$(PY) scripts/bench_unlearning.py --json bench-results/bench.json

# on a GPU machine, with its own Python and torch (no install): see README "GPU check"
OUT ?= bench-results/gpu
gpu-check:
	bash scripts/gpu_check.sh $(OUT)

clean:
	rm -rf $(VENV) runs bench-results
