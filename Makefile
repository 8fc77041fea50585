# FLUX.2 [klein] 9B-KV on Triton + TensorRT. `make help` lists the targets.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= checkpoints/tiny
DTYPE   ?= fp32
ONNX    ?= build/onnx/$(DTYPE)
ENGINES ?= build/engines
REPO    ?= build/model_repository
BACKEND ?= onnxruntime
# Changing these re-exports (graph layouts are part of the serving contract).
EXPORT_SOURCES := $(filter-out export/build_engines.py export/repository.py export/triton_config.py,$(wildcard export/*.py))

.PHONY: help setup checkpoint export repository serve check engines engines-dry-run demo perf bench test clean

help:
	@echo "make setup            create $(VENV) with the pinned CPU toolchain (idempotent)"
	@echo "make checkpoint       write the embedded tiny random checkpoint to checkpoints/tiny"
	@echo "make export           export MODEL (default: tiny) to ONNX in ONNX=$(ONNX) (DTYPE=fp32|bf16|fp16)"
	@echo "make repository       assemble the Triton model repository in REPO=$(REPO) (BACKEND=onnxruntime|tensorrt)"
	@echo "make serve            start tritonserver on REPO and wait (HTTP 8000, gRPC 8001, metrics 8002)"
	@echo "make check            TensorRT compatibility check of the graphs in ONNX"
	@echo "make engines          build TensorRT engines from ONNX (GPU host with TensorRT only)"
	@echo "make engines-dry-run  print the TensorRT optimization profiles without building"
	@echo "make demo             setup, tiny checkpoint, export, repository, tritonserver, a text-to-image"
	@echo "                      and a 2-reference edit over gRPC -> build/demo/*.png, server stopped"
	@echo "make perf             perf_analyzer load test of the served model (3 cases, gRPC + HTTP, concurrency 1-4)"
	@echo "                      -> build/perf/results.md"
	@echo "make bench            Triton vs diffusers (KV and no-KV), per-step cost, throughput, memory"
	@echo "                      -> BENCHMARKS.md (a benchmark: numbers, no pass/fail)"
	@echo "make test             the test suite (setup included)"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# A real tritonserver (2.51, Python backend) ships inside this wheel; its own Python deps are not needed.
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
	touch $@

checkpoints/tiny/model_index.json: | setup
	$(BIN)/python -m export.checkpoint --out checkpoints/tiny

checkpoint: checkpoints/tiny/model_index.json

export: setup $(if $(filter checkpoints/tiny,$(MODEL)),checkpoint)
	$(BIN)/python -m export --model $(MODEL) --out $(ONNX) --dtype $(DTYPE)

$(ONNX)/manifest.json: $(EXPORT_SOURCES)
	$(MAKE) export

repository: setup $(ONNX)/manifest.json
	$(BIN)/python -m export.repository --onnx-dir $(ONNX) --checkpoint $(MODEL) --out $(REPO) \
		--backend $(BACKEND) --engines-dir $(ENGINES)

serve: repository
	$(BIN)/python -m server.launch --repository $(REPO)

check: setup
	$(BIN)/python -m export.trt_compat $(ONNX)

engines: setup
	$(BIN)/python -m export.build_engines --onnx-dir $(ONNX) --out $(ENGINES)

engines-dry-run: setup
	$(BIN)/python -m export.build_engines --onnx-dir $(ONNX) --dry-run

demo: repository
	$(BIN)/python -m clients.demo --repository $(REPO) --out build/demo

perf: repository
	$(BIN)/python -m perf.provision
	$(BIN)/python -m perf.run --repository $(REPO) --out build/perf

# make bench runs on its own random checkpoint: the tiny one with a 512-wide transformer.
BENCH_MODEL := checkpoints/bench
BENCH_ONNX  := build/onnx/bench-fp32

$(BENCH_MODEL)/model_index.json: export/checkpoint.py | setup
	$(BIN)/python -m export.checkpoint --out $(BENCH_MODEL) --size bench

$(BENCH_ONNX)/manifest.json: $(BENCH_MODEL)/model_index.json $(EXPORT_SOURCES)
	$(BIN)/python -m export --model $(BENCH_MODEL) --out $(BENCH_ONNX) --dtype fp32

bench: setup $(BENCH_ONNX)/manifest.json
	$(BIN)/python -m perf.provision
	$(BIN)/python -m bench.bench --checkpoint $(BENCH_MODEL) --onnx-dir $(BENCH_ONNX)

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build checkpoints
