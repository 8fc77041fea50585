# TensorRT engine builder for FLUX.2 [klein] 9B-KV: runs `python3 -m export.build_engines` (standard
# library + the `tensorrt` Python package, nothing else) in NVIDIA's TensorRT container.
# Not built or run yet: the development machines have neither docker nor a GPU.
#
# A plan only loads on the TensorRT version (and GPU architecture) that built it, so this image must
# carry exactly the TensorRT of the Triton image that serves the plans (docker/serving.Dockerfile,
# tritonserver:24.10-py3). Both are NVIDIA release 24.10, and NVIDIA ships one TensorRT per monthly
# release across its containers. Not confirmed: the TensorRT version of release 24.10, and whether the
# tritonserver -py3 image has TensorRT's *Python* package (hence this TensorRT image rather than the
# tritonserver one plus a PyPI `tensorrt` of a version we could not confirm). After a build, compare:
#   docker run --rm IMAGE python3 -c 'import tensorrt; print(tensorrt.__version__)'
# with the version in the plan names the server loads (e.g. transformer_cached.trt10.x.y.sm90.plan).
#
# Build (the context is export/: the builder needs only these four files):
#   docker build -f docker/engines.Dockerfile -t flux2-klein-kv-engines export/
# Run on the GPU that will serve (plans are per architecture), with build/ mounted at /work:
#   docker run --rm --gpus '"device=0"' -v $PWD/build/onnx/bf16:/work/onnx:ro -v $PWD/build:/work \
#     flux2-klein-kv-engines            # -> build/engines/*.plan and the timing cache
FROM nvcr.io/nvidia/tensorrt:24.10-py3

# Fail the build, not the run, if this image has no TensorRT Python package.
RUN python3 -c 'import tensorrt; print("TensorRT", tensorrt.__version__)'

WORKDIR /opt/flux2
COPY __init__.py build_engines.py envelope.py specs.py /opt/flux2/export/

VOLUME /work
CMD ["/bin/sh", "-c", "exec python3 -m export.build_engines --onnx-dir /work/onnx --out /work/engines"]
