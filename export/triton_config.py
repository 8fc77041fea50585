"""Triton `config.pbtxt` for each component, from the declared I/O spec (components.graph_specs).

Three backends, same tensor names, shapes and types, so the BLS model cannot tell them apart:

* `tensorrt` (production): `platform: "tensorrt_plan"`, KIND_GPU.
* `onnxruntime` (this machine): a Python-backend model that runs the same ONNX graph with
  onnxruntime on the CPU, since Triton's onnxruntime backend is not available here; it runs
  the requests Triton batches together as one batch, as an engine would.
* `torch`: the same Python-backend model running the wrapper module the graph is exported
  from, on the BLS's device in the export dtype (a GPU host before its engines exist).

On both, a graph whose every tensor leads with the batch dimension and whose engine batch
(envelope.engine_batch) exceeds 1 gets `max_batch_size` and dynamic batching, so concurrent
requests of equal shapes share one execution: the text encoder. The others take whole shapes
(`max_batch_size: 0`): the VAE encoder (references differ in size), the prefill (one per request),
the cached step (its K/V has no batch axis: the images of one request share it) and the VAE
decoder (one image per call). KIND_GPU instances are pinned to one GPU (`gpus: [N]`): without
it Triton loads every engine on every visible GPU.
"""

from __future__ import annotations

from .envelope import DEFAULT_ENVELOPE, ServingEnvelope
from .specs import GraphSpec

TRITON_TYPES = {"fp32": "TYPE_FP32", "bf16": "TYPE_BF16", "fp16": "TYPE_FP16", "int64": "TYPE_INT64"}
BACKENDS = ("tensorrt", "onnxruntime", "torch")


def _tensor_block(kind: str, tensors, dtype: str, drop_batch: bool) -> str:
    entries = []
    for t in tensors:
        dims = [-1 if isinstance(d, str) else d for d in t.dims]
        if drop_batch:
            dims = dims[1:]
        data_type = TRITON_TYPES["int64" if t.dtype == "int64" else dtype]
        # A per-sample scalar (timestep [batch]) travels as [1] per sample, reshaped to [] for the model.
        reshape = "\n    reshape: { shape: [ ] }" if not dims else ""
        entries.append(f'  {{\n    name: "{t.name}"\n    data_type: {data_type}\n    dims: {dims or [1]}{reshape}\n  }}')
    return f"{kind} [\n" + ",\n".join(entries) + "\n]"


def batchable(spec: GraphSpec) -> bool:
    return all(t.dims and t.dims[0] == "batch" for t in spec.inputs + spec.outputs)


def component_config(spec: GraphSpec, dtype: str, backend: str, instances: int = 1,
                     envelope: ServingEnvelope = DEFAULT_ENVELOPE, gpu: int = 0) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    lines = [f'name: "{spec.name}"']
    # Triton's max_batch_size must not exceed the engine profile's batch range.
    max_batch = envelope.engine_batch[spec.name]
    batch = batchable(spec) and max_batch > 1
    if backend == "tensorrt":
        lines.append('platform: "tensorrt_plan"')
    else:
        lines.append('backend: "python"')
    lines.append(f"max_batch_size: {max_batch if batch else 0}")
    lines.append(_tensor_block("input", spec.inputs, dtype, batch))
    lines.append(_tensor_block("output", spec.outputs, dtype, batch))
    placement = f"kind: KIND_GPU\n    gpus: [ {gpu} ]" if backend == "tensorrt" else "kind: KIND_CPU"
    lines.append(f"instance_group [\n  {{\n    count: {instances}\n    {placement}\n  }}\n]")
    if batch:
        lines.append("dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}")
    return "\n".join(lines) + "\n"
