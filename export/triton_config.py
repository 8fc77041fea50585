"""Triton `config.pbtxt` for each component, from the declared I/O spec (components.graph_specs).

Two backends, same tensor names, shapes and types, so the BLS model cannot tell them apart:

* `tensorrt` (production): `platform: "tensorrt_plan"`, KIND_GPU. Graphs whose every input
  leads with the batch dimension get `max_batch_size` and dynamic batching; the others
  (position ids and K/V have no batch axis) take whole shapes (`max_batch_size: 0`).
* `onnxruntime` (this machine): a Python-backend model that runs the same ONNX graph with
  onnxruntime on the CPU, since Triton's onnxruntime backend is not available here.
"""

from __future__ import annotations

from .components import GraphSpec
from .envelope import DEFAULT_ENVELOPE, ServingEnvelope

TRITON_TYPES = {"fp32": "TYPE_FP32", "bf16": "TYPE_BF16", "fp16": "TYPE_FP16", "int64": "TYPE_INT64"}
BACKENDS = ("tensorrt", "onnxruntime")


def _tensor_block(kind: str, tensors, dtype: str, drop_batch: bool) -> str:
    entries = []
    for t in tensors:
        dims = [-1 if isinstance(d, str) else d for d in t.dims]
        if drop_batch:
            dims = dims[1:]
        data_type = TRITON_TYPES["int64" if t.dtype == "int64" else dtype]
        entries.append(f'  {{\n    name: "{t.name}"\n    data_type: {data_type}\n    dims: {dims}\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def batchable(spec: GraphSpec) -> bool:
    return all(t.dims and t.dims[0] == "batch" for t in spec.inputs + spec.outputs)


def component_config(spec: GraphSpec, dtype: str, backend: str, instances: int = 1,
                     envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lines = [f'name: "{spec.name}"']
    # Triton's max_batch_size must not exceed the engine profile's batch range.
    max_batch = {**envelope.dim_ranges(), **envelope.graph_overrides(spec.name)}["batch"][2]
    batch = backend == "tensorrt" and batchable(spec) and max_batch > 1
    if backend == "tensorrt":
        lines += ['platform: "tensorrt_plan"', f"max_batch_size: {max_batch if batch else 0}"]
    else:
        lines += ['backend: "python"', "max_batch_size: 0"]
    lines.append(_tensor_block("input", spec.inputs, dtype, batch))
    lines.append(_tensor_block("output", spec.outputs, dtype, batch))
    kind = "KIND_GPU" if backend == "tensorrt" else "KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    kind: {kind}\n  }}\n]")
    if batch:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}")
    return "\n".join(lines) + "\n"
