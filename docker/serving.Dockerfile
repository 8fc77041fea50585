# Triton serving image for FLUX.2 [klein] 9B-KV: NVIDIA's Triton 24.12 (server 2.53.0) plus the BLS's
# Python packages.
# Not built or run yet: the development machines have neither docker nor a GPU.
#
# Build (the context is the repository root; .dockerignore lets only the two files copied below in):
#   docker build -f docker/serving.Dockerfile -t flux2-klein-kv-serving .
# Run, on the model repository assembled for TensorRT (make repository BACKEND=tensorrt, BLS on cuda:0),
# with plans built by docker/engines.Dockerfile of the same release:
#   docker run --gpus '"device=0"' --shm-size=8g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -v $PWD/build/model_repository:/models [-e CUDA_POOL_BYTES=N] flux2-klein-kv-serving
# --shm-size: the Python backend moves its CPU tensors (requests, BLS calls) through /dev/shm, and
#   Docker's default /dev/shm is 64 MB.
# --disable-auto-complete-config (below): every config.pbtxt is complete; auto-complete would have the
#   TensorRT backend deserialize every plan a second time at load just to read its I/O.
# --model-control-mode=explicit --load-model=* (below): everything loads at start, and a model whose
#   Python-backend process died can be reloaded alone (python3 /opt/flux2/watchdog.py does it).
#
# Release 24.12 (Triton 2.53.0): its release notes list Ubuntu 24.04 with Python 3.12, and the Python
# backend's stub runs the container's python3; diffusers 0.42.1 and transformers 5.24.0 need Python
# >= 3.11, which rules out the 24.10 image (Python 3.10) whose server (2.51) the CPU tests use. The
# check below stops the build with a clear message if that ever changes. torch 2.13.0 from PyPI is
# its CUDA 13.0 build: the host driver must support CUDA 13.0, whatever CUDA the image has (12.6.3).
FROM nvcr.io/nvidia/tritonserver:24.12-py3

RUN python3 -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 11) else "python3 of this image is %d.%d; the BLS pins (diffusers 0.42.1, transformers 5.24.0) need >= 3.11" % v)'

COPY docker/requirements-serving.txt /opt/flux2/requirements-serving.txt
# Ubuntu 24.04 marks its python3 as externally managed (PEP 668); this image is that Python's only user.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
RUN python3 -m pip install --no-cache-dir -r /opt/flux2/requirements-serving.txt

# Reloads a model whose Python-backend process died; the Kubernetes liveness probe (deploy/kubernetes).
COPY server/watchdog.py /opt/flux2/watchdog.py

# The model repository is mounted, not baked in: /models (plans of ~50 GB, built per GPU architecture).
VOLUME /models

# Bytes of Triton's CUDA memory pool on GPU 0 (tensors between models: BLS <-> engines).
# The default is what `python -m export.memory_plan` prints for the shipped envelope (what the one
# BLS instance on a GPU holds at once: a request's K/V, twice while a step runs, prompt embeddings,
# ...); override with -e.
ENV CUDA_POOL_BYTES=4391200768

EXPOSE 8000 8001 8002

CMD ["/bin/sh", "-c", "exec tritonserver --model-repository=/models --disable-auto-complete-config --cuda-memory-pool-byte-size=0:${CUDA_POOL_BYTES} --model-control-mode=explicit --load-model=*"]
