# FLUX.2 [klein] 9B-KV on Triton + TensorRT. `make help` lists the targets.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= checkpoints/tiny
DTYPE   ?= fp32
ONNX    ?= build/onnx/$(DTYPE)
ENGINES ?= build/engines

.PHONY: help setup checkpoint export check engines engines-dry-run demo test clean

help:
	@echo "make setup            create $(VENV) with the pinned CPU toolchain (idempotent)"
	@echo "make checkpoint       write the embedded tiny random checkpoint to checkpoints/tiny"
	@echo "make export           export MODEL (default: tiny) to ONNX in ONNX=$(ONNX) (DTYPE=fp32|bf16|fp16)"
	@echo "make check            TensorRT compatibility check of the graphs in ONNX"
	@echo "make engines          build TensorRT engines from ONNX (GPU host with TensorRT only)"
	@echo "make engines-dry-run  print the TensorRT optimization profiles without building"
	@echo "make demo             the main job end to end on the tiny checkpoint (setup included)"
	@echo "make test             the test suite (setup included)"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	touch $@

checkpoints/tiny/model_index.json: | setup
	$(BIN)/python -m export.checkpoint --out checkpoints/tiny

checkpoint: checkpoints/tiny/model_index.json

export: setup $(if $(filter checkpoints/tiny,$(MODEL)),checkpoint)
	$(BIN)/python -m export --model $(MODEL) --out $(ONNX) --dtype $(DTYPE)

check: setup
	$(BIN)/python -m export.trt_compat $(ONNX)

engines: setup
	$(BIN)/python -m export.build_engines --onnx-dir $(ONNX) --out $(ENGINES)

engines-dry-run: setup
	$(BIN)/python -m export.build_engines --onnx-dir $(ONNX) --dry-run

demo: export
	$(BIN)/python -m export.trt_compat $(ONNX)
	$(BIN)/python -m export.build_engines --onnx-dir $(ONNX) --dry-run

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf build checkpoints
