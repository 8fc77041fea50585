# FLUX.2 [klein] 9B-KV on Triton + TensorRT. `make help` lists the targets.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
MODEL   ?= checkpoints/tiny
DTYPE   ?= fp32
# QUANTIZE=fp8: FP8 linear layers in the text encoder and transformer graphs (ModelOpt calibration; the
# 48gb-fp8 and 32gb-fp8 tiers take them: make export DTYPE=bf16 QUANTIZE=fp8 on the GPU host).
QUANTIZE ?=
ONNX    ?= build/onnx/$(DTYPE)$(if $(QUANTIZE),-$(QUANTIZE))
ENGINES ?= build/engines
REPO    ?= build/model_repository
BACKEND ?= onnxruntime
# Ports of make serve, make demo and make docker-serving (on the host).
HTTP_PORT    ?= 8000
GRPC_PORT    ?= 8001
METRICS_PORT ?= 8002
PORTS := --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)
# VERBOSE=1: the frameworks' warnings and progress bars (export, demo) and tritonserver's own log
# (serve) on the terminal; quiet by default (tritonserver's log then goes to a file the launcher names).
VERBOSE ?=
# Where the BLS computes: empty = cuda:0 for BACKEND=tensorrt, cpu otherwise. Inside a container
# started with --gpus '"device=N"' the one visible GPU is cuda:0.
DEVICE  ?=
# The engine builder needs only the standard library and tensorrt: no venv (python3 of NVIDIA's container).
ENGINE_PYTHON ?= python3
# Host GPU for the docker-* targets; CUDA_POOL_BYTES overrides the serving image's pool size (its
# default is what python -m flux2_serving.serving.memory_plan prints for the shipped envelope).
GPU ?= 0
# make memory-plan: the card's memory (the tier made for it is picked) or a tier by name (contract/tiers.py);
# TIER also sets the profiles of make engines and the envelope and cache of make repository.
GPU_GIB ?= 80
TIER ?=
CUDA_POOL_BYTES ?=
# NVIDIA's release of both images (docker/serving.Dockerfile says why this one): the one place; the
# Dockerfiles' ARG RELEASE defaults and the Kubernetes image tags must equal it (tests/test_build_engines.py).
RELEASE := 26.07
# Changing these re-exports (graph layouts are part of the serving contract).
EXPORT_SOURCES := $(filter-out export/build_engines.py export/engine_check.py export/profile_walk.py,$(wildcard export/*.py)) \
	$(wildcard flux2_serving/modeling/*.py) flux2_serving/contract/specs.py flux2_serving/contract/envelope.py

.PHONY: help setup checkpoint export repository serve check engines engines-dry-run memory-plan docker-engines \
	docker-serving docker-engine-check demo perf bench front gpu-bundle gpu-check test clean

help:
	@echo "make setup            create $(VENV) with the pinned CPU toolchain (idempotent)"
	@echo "make checkpoint       write the embedded tiny random checkpoint to checkpoints/tiny"
	@echo "make export           export MODEL (default: tiny) to ONNX in ONNX=$(ONNX) (DTYPE=fp32|bf16|fp16;"
	@echo "                      QUANTIZE=fp8: FP8 text encoder and transformer, calibrated with NVIDIA ModelOpt)"
	@echo "make repository       assemble the Triton model repository in REPO=$(REPO) (BACKEND=onnxruntime|tensorrt|torch,"
	@echo "                      DEVICE=cpu|cuda:N for the BLS; default cuda:0 with tensorrt); tokenizer and"
	@echo "                      scheduler come from the model recorded in ONNX/manifest.json"
	@echo "make serve            start tritonserver on REPO and wait (HTTP_PORT=$(HTTP_PORT), GRPC_PORT=$(GRPC_PORT),"
	@echo "                      METRICS_PORT=$(METRICS_PORT)); its log goes to build/tritonserver/ (VERBOSE=1: terminal)"
	@echo "make check            TensorRT compatibility check of the graphs in ONNX, and every tensor at the profile"
	@echo "                      maximum under 2^31-1 elements (flux2_serving.export.profile_walk)"
	@echo "make engines          build TensorRT engines from ONNX (GPU host with TensorRT only; ENGINE_PYTHON=python3)"
	@echo "make engine-check     after engines: each plan vs onnxruntime, same inputs (Polygraphy; REFERENCE_ONNX=fp32 export for bf16)"
	@echo "make docker-engines   the same inside NVIDIA's TensorRT $(RELEASE) container (docker/engines.Dockerfile), GPU=$(GPU)"
	@echo "make docker-engine-check  make engine-check inside the engines image (TensorRT $(RELEASE), GPU=$(GPU);"
	@echo "                      REFERENCE_ONNX=fp32 export for bf16)"
	@echo "make docker-serving   tritonserver $(RELEASE) on REPO (docker/serving.Dockerfile), GPU=$(GPU), on the host's"
	@echo "                      HTTP_PORT, GRPC_PORT, METRICS_PORT; the admin"
	@echo "                      APIs need \$$FLUX2_ADMIN_KEY (passed through when set; else closed)"
	@echo "make engines-dry-run  print the TensorRT optimization profiles without building"
	@echo "make memory-plan      GPU memory of the served klein 9B on GPU_GIB=80 (the tier made for that card:"
	@echo "                      80gb-bf16, 48gb-fp8, 32gb-fp8, or TIER=...): weights, profile-max I/O,"
	@echo "                      activations, BLS, cache; fails when under 15% headroom"
	@echo "make demo             setup, tiny checkpoint, export, repository, tritonserver, a text-to-image"
	@echo "                      and a 2-reference edit over gRPC -> build/demo/*.png, server stopped"
	@echo "                      (on HTTP_PORT, GRPC_PORT, METRICS_PORT as make serve)"
	@echo "make front            the OpenAI Images API (/v1/images/generations, /v1/images/edits) on FRONT_PORT=9000,"
	@echo "                      forwarding to the server of make serve (GRPC_PORT)"
	@echo "make perf             perf_analyzer load test of the served model (3 cases, gRPC + HTTP, concurrency 1-4);"
	@echo "                      RUNNING=1: against the server of make serve (no admin key needed)"
	@echo "                      -> build/perf/results.md"
	@echo "make bench            Triton vs diffusers (KV and no-KV), per-step cost, throughput, memory,"
	@echo "                      serving overhead at 1024^2, 2 replicas behind nginx (affinity vs round robin),"
	@echo "                      16 clients against the bounded queue (vs unbounded), FP8 vs fp32 images,"
	@echo "                      the OpenAI front's overhead and an AIPerf load run next to perf_analyzer,"
	@echo "                      the gate's cost per request (through it vs straight to tritonserver)"
	@echo "                      -> BENCHMARKS.md (a benchmark: numbers, no pass/fail)"
	@echo "make gpu-bundle       gather what a bare GPU machine lacks (tritonserver, diffusers, numpy<2, ...) into"
	@echo "                      build/gpu_bundle (< 60 MiB; run where packages install)"
	@echo "make gpu-check        the prepared GPU check, within 480 s: environment, served 9B-dims latency vs diffusers,"
	@echo "                      tiny served parity, FP8 vs bf16 step, transformer probe -> build/gpu_check, and on a"
	@echo "                      GPU BENCHMARKS.md (python -m bench.gpu_check --plan: the time boxes and their estimates)"
	@echo "                      (CPU: tiny stages)"
	@echo "make test             ruff, then the test suite (setup included)"
	@echo "make clean            remove what the CPU workflow made (keeps your checkpoints, bf16 exports, engines)"
	@echo "VERBOSE=1             export, serve, demo: show the frameworks' warnings and tritonserver's own log"

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	# A real tritonserver (2.51, Python backend) ships inside this wheel; its own Python deps are not needed.
	$(BIN)/python -m pip install -q --no-deps nvidia-pytriton==0.7.0
	# This project's package, editable: every folder (model_repository's model.py files included, which
	# Triton's Python backend runs with this venv's Python) imports flux2_serving by name.
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $@

checkpoints/tiny/model_index.json: | setup
	$(BIN)/python -m flux2_serving.modeling.checkpoint --out checkpoints/tiny

checkpoint: checkpoints/tiny/model_index.json

export: setup $(if $(filter checkpoints/tiny,$(MODEL)),checkpoint)
	$(BIN)/python -m flux2_serving.export --model $(MODEL) --onnx-dir $(ONNX) --dtype $(DTYPE) \
		$(if $(QUANTIZE),--quantize $(QUANTIZE)) $(if $(VERBOSE),--verbose)

# Re-export by itself only the embedded tiny model (a minute): never over an export of another
# model (a 9B export takes hours and a GPU host's memory).
$(ONNX)/manifest.json: $(EXPORT_SOURCES)
	@if [ -f $@ ] && ! grep -q '"model": ".*checkpoints/tiny"' $@; then \
		echo "note: $@ (not the tiny model) is older than export/*.py; re-export it (make export MODEL=...) if the graph layout changed"; \
	else $(MAKE) export; fi

repository: setup $(ONNX)/manifest.json
	$(BIN)/python -m flux2_serving.serving.repository --onnx-dir $(ONNX) --repository $(REPO) \
		--backend $(BACKEND) --engines-dir $(ENGINES) $(if $(DEVICE),--device $(DEVICE)) $(if $(TIER),--tier $(TIER))

# Serve what is there: assemble only when REPO has no repository yet (make repository rebuilds it).
serve: setup
	@if [ -f $(REPO)/flux2_klein_kv/config.pbtxt ]; then \
		echo "serving the existing repository $(REPO) (make repository rebuilds it)"; \
	else $(MAKE) repository; fi
	$(BIN)/python -m flux2_serving.server.launch --repository $(REPO) $(PORTS) $(if $(VERBOSE),--verbose)

check: setup
	$(BIN)/python -m flux2_serving.export.trt_compat $(ONNX)
	$(BIN)/python -m flux2_serving.export.profile_walk $(ONNX)

# ENGINE_PYTHON has neither the venv nor this project installed: build/engine_tool holds links to what the
# engines image copies (the package's __init__, contract/, export/), and python3 -m runs from there.
ENGINE_TOOL := build/engine_tool
$(ENGINE_TOOL)/.linked:
	rm -rf $(ENGINE_TOOL) && mkdir -p $(ENGINE_TOOL)/flux2_serving
	ln -s $(CURDIR)/flux2_serving/__init__.py $(CURDIR)/flux2_serving/contract $(ENGINE_TOOL)/flux2_serving/
	ln -s $(CURDIR)/export $(ENGINE_TOOL)/flux2_serving/export
	touch $@

engines: $(ENGINE_TOOL)/.linked
	cd $(ENGINE_TOOL) && $(ENGINE_PYTHON) -m flux2_serving.export.build_engines --onnx-dir $(abspath $(ONNX)) \
		--engines-dir $(abspath $(ENGINES)) $(if $(TIER),--tier $(TIER))

# After make engines, with the venv's python (polygraphy, onnxruntime, numpy; torch for bf16 engines) plus the
# tensorrt that built the plans: without tensorrt, a GPU or the plans it exits 2 in one line (a check that cannot
# see the engines does not pass; python -m flux2_serving.export.engine_check --onnxruntime-only runs that half).
.PHONY: engine-check
engine-check: setup
	$(BIN)/python -m flux2_serving.export.engine_check --onnx-dir $(ONNX) --engines-dir $(ENGINES) \
		$(if $(REFERENCE_ONNX),--reference-onnx-dir $(REFERENCE_ONNX))

engines-dry-run: $(ENGINE_TOOL)/.linked
	cd $(ENGINE_TOOL) && $(ENGINE_PYTHON) -m flux2_serving.export.build_engines --onnx-dir $(abspath $(ONNX)) \
		--engines-dir $(abspath $(ENGINES)) --dry-run $(if $(TIER),--tier $(TIER))

docker-engines:
	docker build -f docker/engines.Dockerfile --build-arg RELEASE=$(RELEASE) -t flux2-klein-kv-engines:$(RELEASE) .
	mkdir -p $(ENGINES)
	docker run --rm --gpus '"device=$(GPU)"' -v $(CURDIR)/$(ONNX):/work/onnx:ro \
		-v $(CURDIR)/$(ENGINES):/work/engines flux2-klein-kv-engines:$(RELEASE) $(if $(TIER),--tier $(TIER))

# The engine check where TensorRT and the GPU are: the engines image's engine-check target (make engine-check's
# code); REFERENCE_ONNX: an fp32 export of the same model, for a bf16 ONNX (onnxruntime has no CPU bf16 kernels).
docker-engine-check:
	docker build -f docker/engines.Dockerfile --target engine-check --build-arg RELEASE=$(RELEASE) \
		-t flux2-klein-kv-engine-check:$(RELEASE) .
	docker run --rm --gpus '"device=$(GPU)"' -v $(CURDIR)/$(ONNX):/work/onnx:ro -v $(CURDIR)/$(ENGINES):/work/engines \
		$(if $(REFERENCE_ONNX),-v $(CURDIR)/$(REFERENCE_ONNX):/work/reference:ro) flux2-klein-kv-engine-check:$(RELEASE) \
		$(if $(REFERENCE_ONNX),--reference-onnx-dir /work/reference)

docker-serving:
	docker build -f docker/serving.Dockerfile --build-arg RELEASE=$(RELEASE) -t flux2-klein-kv-serving:$(RELEASE) .
	docker run --rm --gpus '"device=$(GPU)"' --shm-size=8g -p $(HTTP_PORT):8000 -p $(GRPC_PORT):8001 \
		-p $(METRICS_PORT):8002 \
		-v $(CURDIR)/$(REPO):/models $(if $(CUDA_POOL_BYTES),-e CUDA_POOL_BYTES=$(CUDA_POOL_BYTES)) \
		$(if $(FLUX2_ADMIN_KEY),-e FLUX2_ADMIN_KEY) \
		flux2-klein-kv-serving:$(RELEASE)

memory-plan: setup
	$(BIN)/python -m flux2_serving.serving.memory_plan --dtype bf16 --gpu-gib $(GPU_GIB) $(if $(TIER),--tier $(TIER))

demo: repository
	$(BIN)/python -m flux2_serving.clients.demo --repository $(REPO) --out build/demo $(PORTS) $(if $(VERBOSE),--verbose)

# RUNNING=1: against the server make serve started (HTTP_PORT, GRPC_PORT) instead of a server of its own.
perf: $(if $(RUNNING),setup,repository)
	$(BIN)/python -m perf.provision
	$(BIN)/python -m perf.run $(if $(RUNNING),--grpc-url 127.0.0.1:$(GRPC_PORT) --http-url 127.0.0.1:$(HTTP_PORT),--repository $(REPO)) \
		--out build/perf

# make bench runs on its own random checkpoint: the tiny one with a 512-wide transformer.
BENCH_MODEL := checkpoints/bench
BENCH_ONNX  := build/onnx/bench-fp32

$(BENCH_MODEL)/model_index.json: flux2_serving/modeling/checkpoint.py | setup
	$(BIN)/python -m flux2_serving.modeling.checkpoint --out $(BENCH_MODEL) --size bench

$(BENCH_ONNX)/manifest.json: $(BENCH_MODEL)/model_index.json $(EXPORT_SOURCES)
	$(BIN)/python -m flux2_serving.export --model $(BENCH_MODEL) --onnx-dir $(BENCH_ONNX) --dtype fp32

# Its serving-overhead and scale-out parts use the tiny model, from an export of its own.
OVERHEAD_ONNX := build/onnx/tiny-fp32

$(OVERHEAD_ONNX)/manifest.json: checkpoints/tiny/model_index.json $(EXPORT_SOURCES)
	$(BIN)/python -m flux2_serving.export --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX) --dtype fp32

bench: setup $(BENCH_ONNX)/manifest.json $(OVERHEAD_ONNX)/manifest.json
	$(BIN)/python -m perf.provision
	$(BIN)/python -m bench.bench --model $(BENCH_MODEL) --onnx-dir $(BENCH_ONNX)
	$(BIN)/python -m bench.overhead --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX)
	$(BIN)/python -m bench.scaleout --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX)
	$(BIN)/python -m bench.overload --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX)
	$(BIN)/python -m bench.fp8_quality --model $(BENCH_MODEL) --onnx-dir $(BENCH_ONNX)
	$(BIN)/python -m bench.front --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX)
	$(BIN)/python -m bench.gate_cost --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX)
	$(BIN)/python -m bench.self_repair --model checkpoints/tiny --onnx-dir $(OVERHEAD_ONNX)

# The OpenAI Images API in front of a running server (make serve): http://127.0.0.1:$(FRONT_PORT)/v1
FRONT_PORT ?= 9000
front: setup
	$(BIN)/python -m flux2_serving.front --triton-grpc 127.0.0.1:$(GRPC_PORT) --port $(FRONT_PORT)

gpu-bundle: setup
	$(BIN)/python -m bench.gpu_bundle --out build/gpu_bundle

# No setup here: a GPU machine may have no network. Without the venv, python3 uses build/gpu_bundle.
GPU_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --bundle build/gpu_bundle --benchmarks BENCHMARKS.md

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# Only what the CPU workflow made: never a checkpoint you put in checkpoints/, another model's export
# (build/onnx/bf16, hours at 9B) or engines (build/engines).
clean:
	rm -rf build/model_repository build/demo build/perf build/tritonserver build/tools build/gpu_check build/engine_tool \
		build/gpu_venv build/onnx/fp32 build/onnx/bench-fp32 build/onnx/tiny-fp32
	@for d in checkpoints/tiny checkpoints/bench; do \
		if [ -f $$d/TINY_CHECKPOINT.json ]; then rm -rf $$d; echo "removed $$d"; fi; done
