# TensorRT engine builder for FLUX.2 [klein] 9B-KV: runs `python3 -m flux2_serving.export.build_engines` (standard
# library + the `tensorrt` Python package, nothing else) in NVIDIA's TensorRT container.
# Not built or run yet: the development machines have neither docker nor a GPU.
#
# A plan only loads on the TensorRT version (and GPU architecture) that built it, so this image must
# carry exactly the TensorRT of the Triton image that serves the plans (docker/serving.Dockerfile,
# tritonserver:${RELEASE}-py3): both are NVIDIA release RELEASE (the Makefile's RELEASE, the one place;
# docker/serving.Dockerfile says why 26.07). TensorRT 11 from 26.06 on (server commit d898a0fe6 prepared
# 26.06 for it); not confirmed from any source here: the exact TensorRT version release 26.07 carries, that
# the tensorrt and tritonserver -py3 images of 26.07 carry the same one (variants of one release can differ:
# NVIDIA's matrix lists TensorRT 10.4.0 and CUDA 12.5.1 for tritonserver:24.10-trtllm-python-py3, while
# release 24.10 is based on CUDA 12.6.2), and whether the tritonserver -py3 image has TensorRT's *Python*
# package (hence this TensorRT image, not the tritonserver one plus a PyPI `tensorrt` of an unconfirmed
# version). The build prints this image's version (below). Before building 50 GB of plans, compare
#   docker run --rm IMAGE python3 -c 'import tensorrt; print(tensorrt.__version__)'
# with the libnvinfer.so.X.Y.Z of the serving image:
#   docker run --rm SERVING_IMAGE sh -c 'find / -name "libnvinfer.so.*" 2>/dev/null'
# The plan names carry the builder's version (e.g. transformer_cached.trt11.x.y.sm90.plan).
#
# Build (the context is the repository root; .dockerignore lets in what the images copy. The builder needs only
# the files copied below, standard library and tensorrt; tests/test_build_engines.py imports it from exactly those):
#   docker build -f docker/engines.Dockerfile --build-arg RELEASE=26.07 -t flux2-klein-kv-engines .
# Run on the kind of GPU that will serve (plans are per architecture), the bf16 export at /work/onnx:
#   docker run --rm --gpus '"device=0"' -v $PWD/build/onnx/bf16:/work/onnx:ro \
#     -v $PWD/build/engines:/work/engines flux2-klein-kv-engines   # -> *.plan and the timing cache
ARG RELEASE=26.07
FROM nvcr.io/nvidia/tensorrt:${RELEASE}-py3 AS engines

# Fail the build, not the run, if this image has no TensorRT Python package.
RUN python3 -c 'import tensorrt; print("TensorRT", tensorrt.__version__)'

WORKDIR /opt/flux2
COPY flux2_serving/__init__.py /opt/flux2/flux2_serving/
COPY flux2_serving/contract/__init__.py flux2_serving/contract/cli_help.py flux2_serving/contract/envelope.py flux2_serving/contract/graphs.py flux2_serving/contract/manifest.py flux2_serving/contract/specs.py flux2_serving/contract/tiers.py /opt/flux2/flux2_serving/contract/
COPY export/__init__.py export/build_engines.py /opt/flux2/flux2_serving/export/

VOLUME /work
# Arguments after the image name go to the builder (make docker-engines passes --tier TIER): the ENTRYPOINT
# holds the fixed part, so they add to it instead of replacing a CMD.
ENTRYPOINT ["python3", "-m", "flux2_serving.export.build_engines", "--onnx-dir", "/work/onnx", "--out", "/work/engines"]

# The engine check (make docker-engine-check): each plan against onnxruntime where the TensorRT that built it and
# the GPU are, this image plus what the check imports (polygraphy, onnxruntime, numpy < 2, and torch for bf16
# engines, whose inputs Polygraphy feeds as torch tensors: the CPU build is enough). Its own target, so the
# builder image stays standard library + tensorrt:
#   docker build -f docker/engines.Dockerfile --target engine-check -t flux2-klein-kv-engine-check .
FROM engines AS engine-check
COPY docker/requirements-engine-check.txt /opt/flux2/requirements-engine-check.txt
RUN python3 -m pip install --no-cache-dir -r /opt/flux2/requirements-engine-check.txt
COPY flux2_serving/modeling/__init__.py flux2_serving/modeling/latent_layout.py /opt/flux2/flux2_serving/modeling/
COPY export/engine_check.py /opt/flux2/flux2_serving/export/
ENTRYPOINT ["python3", "-m", "flux2_serving.export.engine_check", "--onnx-dir", "/work/onnx", "--engines-dir", "/work/engines", "--out", "/work/engines/engine_check"]
