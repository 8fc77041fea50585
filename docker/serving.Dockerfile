# Triton serving image for FLUX.2 [klein] 9B-KV: NVIDIA's Triton 26.07 (server 2.71.0) plus the BLS's
# Python packages and the hardened entry point (python3 -m flux2_serving.server.serve, flux2_serving/server/serve.py).
# Not built or run yet: the development machines have neither docker nor a GPU.
#
# Build (the context is the repository root; .dockerignore lets only what is copied below in):
#   docker build -f docker/serving.Dockerfile --build-arg RELEASE=26.07 -t flux2-klein-kv-serving .
# Run, on the model repository assembled for TensorRT (make repository BACKEND=tensorrt, BLS on cuda:0),
# with plans built by docker/engines.Dockerfile of the same release:
#   docker run --gpus '"device=0"' --shm-size=8g -p 8000:8000 -p 8001:8001 -p 8002:8002 \
#     -v $PWD/build/model_repository:/models -e FLUX2_ADMIN_KEY=$(cat admin-key) \
#     [-e CUDA_POOL_BYTES=N] flux2-klein-kv-serving
# or, keeping the key out of `docker inspect`, a mounted file:
#     -v $PWD/admin-key:/run/secrets/flux2-admin-key:ro -e FLUX2_ADMIN_KEY_FILE=/run/secrets/flux2-admin-key
# Admin key (flux2_serving/contract/security.py; make one with `openssl rand -hex 32`): Triton's model-repository
#   (load/unload/overrides: code execution), shared-memory, logging and trace APIs answer
#   only requests with the header flux2-admin-key (gRPC metadata triton-grpc-protocol-flux2-admin-key).
#   Without FLUX2_ADMIN_KEY or FLUX2_ADMIN_KEY_FILE those APIs are closed to everyone (the server still
#   serves; the watchdog then cannot reload models). `docker run ... IMAGE python3 -m flux2_serving.server.serve
#   --print [options]` prints the tritonserver command, key masked.
# --shm-size: the Python backend moves its CPU tensors (requests, BLS calls) through /dev/shm, and
#   Docker's default /dev/shm is 64 MB.
# --disable-auto-complete-config (below): every config.pbtxt is complete; auto-complete would have the
#   TensorRT backend deserialize every plan a second time at load just to read its I/O.
# --model-control-mode=explicit --load-model=* (below): everything loads at start, and a model whose
#   Python-backend process died can be reloaded alone (python3 -m flux2_serving.server.watchdog does it, with the key).
# flux2_serving.server.serve puts in front: the restrictions above, --http/grpc/metrics-address=0.0.0.0 (the
#   container's network is its boundary) and an
#   internal secret for the internal models; then it execs tritonserver (PID 1 gets the signals).
#
# Why release 26.07: the newest release whose sources could be read here at its tag (server v2.71.0 and its
# build.py version map: "release_version": "2.71.0", "triton_container_version": "26.07"; python_backend and
# tensorrt_backend r26.07). It has what older ones lack: a Python-backend instance whose stub died or hangs
# reports not ready (python_backend PR #423, 26.01), a model's own is_ready() (PR #430, 26.03; the BLS has
# one), a bound on the decompressed HTTP body (server PR #8570, 26.01) and rapidjson's iterative parse
# (common PR #156, 26.05). Newer releases exist (26.08 is branch r26.08, Triton 2.72.0, not tagged in the
# sources read; NVIDIA's release notes for 26.09 and 26.10 exist, CUDA 13.4.x), but their backends' sources
# were not readable here. And the 2025 bulletins' fixes, which 24.12 lacks:
# out-of-bounds read/write and information disclosure through shared memory (bulletin 5687, August
# 2025: CVE-2025-23319, -23320, -23334, -23318, -23333; fixed in 25.07), remote code execution through
# the model name of the model-control APIs and memory corruption through the Python backend's
# shared-memory region (5691, September 2025: CVE-2025-23316, -23329; fixed in 25.08), and later ones
# (5723: CVE-2025-33202, fixed in 25.09; 5734: CVE-2025-33211, -33201, fixed in 25.10).
# Release 26.07: Triton server 2.71.0 on CUDA 13.3 (NVIDIA's release notes), Ubuntu 24.04 (r26.07 build.py),
# Python 3.12 (3.12.3 in build.py's table), TensorRT 11 (exact version unconfirmed: docker/engines.Dockerfile).
# The release notes of 26.0x name no minimum driver; CUDA 13's minor-version compatibility starts at R580, and
# torch 2.13.0 from PyPI is a CUDA 13.0 build that needs R580 anyway (not checked for CUDA 13.3 here). The Python
# backend's stub runs the container's python3; diffusers 0.42.1 and transformers 5.24.0 need Python
# >= 3.11: the check below stops the build with a clear message if the image's python3 is older.
# The CPU tests run the tritonserver 2.51 of the nvidia-pytriton wheel: flux2_serving.server.serve's options and
# the Python backend were tested on 2.51 only, not on 2.71.0.
ARG RELEASE=26.07
FROM nvcr.io/nvidia/tritonserver:${RELEASE}-py3

RUN python3 -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 11) else "python3 of this image is %d.%d; the BLS pins (diffusers 0.42.1, transformers 5.24.0) need >= 3.11" % v)'

COPY docker/requirements-serving.txt /opt/flux2/requirements-serving.txt
# Ubuntu 24.04 marks its python3 as externally managed (PEP 668); this image is that Python's only user.
ENV PIP_BREAK_SYSTEM_PACKAGES=1
# torch requires setuptools>=77.0.3; the image's setuptools is Debian's (apt, no RECORD file), which pip cannot
# uninstall to upgrade ("RECORD file not found ... installed by debian"). --ignore-installed puts the pinned one
# beside it in /usr/local/lib/python3.X/dist-packages, first on sys.path, without touching Debian's; the
# requirements then find it satisfied. Chosen over a venv: the Python-backend stub keeps embedding the image's
# own python3 with no PATH or LD_LIBRARY_PATH arrangement, as NVIDIA's images expect.
RUN python3 -m pip install --no-cache-dir --ignore-installed "$(grep '^setuptools==' /opt/flux2/requirements-serving.txt)" \
    && python3 -m pip install --no-cache-dir -r /opt/flux2/requirements-serving.txt

# This project's serving side: flux2_serving/ (contract, modeling, models, serving, server), not the top-level
# export/ and clients/ folders (the exporter and the clients; nothing served imports them, tests/test_structure.py
# checks). The models the repository's model.py files import (flux2_serving.models), the entry point (python3 -m
# flux2_serving.server.serve), the watchdog (also the Kubernetes liveness probe). A .pth file in site-packages
# puts it on the path, as pip's install would: the Python-backend stub embeds this python3 and reads .pth files
# (it ignores PYTHONPATH). Not pip-installed: the wheel would need export/ and clients/ in the image.
COPY flux2_serving /opt/flux2/lib/flux2_serving
RUN python3 -c 'import site; open(site.getsitepackages()[0] + "/flux2_serving.pth", "w").write("/opt/flux2/lib\n")' \
    && cd / && python3 -c 'import flux2_serving.server.serve, flux2_serving.models.input_checks'

# The model repository is mounted, not baked in: /models (plans of ~50 GB, built per GPU architecture).
VOLUME /models

# Bytes of Triton's CUDA memory pool on GPU 0 (tensors between models: BLS <-> engines).
# The default is what `python -m flux2_serving.serving.memory_plan` prints for the shipped envelope (what the one
# BLS instance on a GPU holds at once: a request's K/V, twice while a step runs, prompt embeddings,
# ...); override with -e.
ENV CUDA_POOL_BYTES=4391200768

EXPOSE 8000 8001 8002

# sh -c for ${CUDA_POOL_BYTES}; exec, then flux2_serving.server.serve's exec, leave tritonserver as PID 1.
# --exit-timeout-secs=60: requests in flight get a minute to finish on SIGTERM.
CMD ["/bin/sh", "-c", "exec python3 -m flux2_serving.server.serve --model-repository=/models --disable-auto-complete-config --cuda-memory-pool-byte-size=0:${CUDA_POOL_BYTES} --model-control-mode=explicit '--load-model=*' --exit-timeout-secs=60"]
