"""Export each component wrapper to ONNX with `torch.onnx.export(dynamo=True)`.

Dynamic axes come from the declared I/O spec (`specs.graph_specs`). torch.export
specialises any dimension whose sample size is 0 or 1, so every dynamic dimension is
traced at a size >= 2, and sizes are distinct so no two dimensions get unified by accident.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from flux2_serving.contract.graphs import COMPONENTS, GRAPHS
from flux2_serving.contract.specs import GraphSpec, graph_specs
from flux2_serving.contract.tiers import FP8_ENGINES
from flux2_serving.export import fp8
from flux2_serving.modeling import components as C
from flux2_serving.modeling.latent_layout import grid_ids, reference_ids, text_ids
from flux2_serving.modeling.loading import DTYPES, load_pipeline, read_model_dims

OPSET = 18  # within TensorRT 10's parser range (opset 9-20), see trt_supported_ops.tsv
LARGE_GRAPH_BYTES = 1 << 30  # weights go to external data well before protobuf's 2 GB limit

# Trace-time sizes of the dynamic dims (all >= 2 and distinct).
TRACE = {"batch": 2, "text_len": 7, "lat_h": 3, "lat_w": 5, "n_ref": 10}
# Upper bounds of the dynamic dims; the serving envelope (envelope.py) is well inside them.
MAX = {"batch": 64, "text_len": 4096, "lat_h": 512, "lat_w": 512, "n_ref": 65536}


def sample_inputs(name: str, config: dict, dtype: torch.dtype, sizes: dict | None = None) -> tuple:
    """Random inputs of graph `name`, in its declared order and shapes, with the dynamic dims at
    `sizes` (defaults: the trace sizes). Float tensors are normal noise; the integer inputs and
    the image range follow what each input means."""
    s = {**TRACE, **(sizes or {})}
    s.update(height=16 * s["lat_h"], width=16 * s["lat_w"])  # reference pixels: multiples of 16
    g = torch.Generator().manual_seed(0)
    special = {
        "input_ids": lambda shape: torch.randint(0, config.get("vocab_size", 256), shape, generator=g),
        "attention_mask": _mask,
        "image": lambda shape: (torch.rand(shape, generator=g) * 2 - 1).to(dtype),
        "timestep": lambda shape: torch.rand(shape, generator=g).to(dtype),
        "ref_ids": lambda shape: torch.from_numpy(reference_ids(shape[0])),
        "img_ids": lambda shape: torch.from_numpy(grid_ids(shape[0], shape[1])),
        "txt_ids": lambda shape: torch.from_numpy(text_ids(shape[0])),
    }
    spec = graph_specs(config)[name]
    inputs = []
    for tensor in spec.inputs:
        shape = tuple(s[d] if isinstance(d, str) else d for d in tensor.dims)
        make = special.get(tensor.name, lambda shape: torch.randn(shape, generator=g).to(dtype))
        inputs.append(make(shape))
    return tuple(inputs)


def _mask(shape) -> torch.Tensor:
    mask = torch.ones(shape, dtype=torch.long)
    mask[0, shape[1] // 2:] = 0  # right padding in the first sample, as the pipeline's tokenizer pads
    return mask


def dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export dynamic shapes of every input, in order, from the declared dims of `spec`."""
    dims = {name: Dim(name, min=1, max=MAX[name]) for name in ("batch", "text_len", "lat_h", "lat_w")}
    if GRAPHS[spec.name].min_references is not None:  # 0: text-to-image; a prefill has at least one token
        dims["n_ref"] = Dim("n_ref", min=GRAPHS[spec.name].min_references, max=MAX["n_ref"])
    # Reference pixels: multiples of 16 (the VAE downsamples 8x, then 2x2 patches).
    dims["height"] = 16 * Dim("ref_h", min=1, max=MAX["lat_h"])
    dims["width"] = 16 * Dim("ref_w", min=1, max=MAX["lat_w"])
    shapes = tuple({axis: dims[dim] for axis, dim in enumerate(tensor.dims) if isinstance(dim, str)}
                   for tensor in spec.inputs)
    if spec.name == "transformer_cached":  # forward(latents, ..., txt_ids, *ref_kv): the K/V are one varargs group
        return (*shapes[:5], shapes[5:])
    return shapes


def _finish_graph(path: Path, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the dimension names of the declared spec, and run every
    half-precision softmax in fp32 (softmax_in_fp32). The weights (external data) are not touched."""
    proto = onnx.load(str(path), load_external_data=False)
    for values, tensors in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for value in values:
            tensor = by_name[value.name]
            for dim, declared in zip(value.type.tensor_type.shape.dim, tensor.dims, strict=True):
                if isinstance(declared, str):
                    dim.dim_param = declared
    softmax_in_fp32(proto)
    onnx.save(proto, str(path))


HALF = (onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT16)


def softmax_in_fp32(proto: onnx.ModelProto) -> int:
    """Wrap every Softmax whose input is bf16 or fp16 in Cast(fp32) -> Softmax -> Cast(back).

    A strongly typed TensorRT network computes each layer in its ONNX types: where attention is not
    fused into one kernel, a bf16 Softmax would exponentiate and sum the logits in bf16 (8 mantissa
    bits), while diffusers' SDPA (flash or memory-efficient kernels) accumulates the softmax in fp32.
    The logits themselves stay bf16 (the MatMul's output type). Returns how many were wrapped."""
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type
             for v in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)}
    nodes, wrapped = [], 0
    for node in proto.graph.node:
        half = types.get(node.input[0]) if node.op_type == "Softmax" else None
        if half not in HALF:
            nodes.append(node)
            continue
        wrapped += 1
        source, target = node.input[0], node.output[0]
        up, down = f"{source}__fp32", f"{target}__fp32"
        nodes.append(onnx.helper.make_node("Cast", [source], [up], name=f"{node.name}__to_fp32",
                                           to=onnx.TensorProto.FLOAT))
        node.input[0], node.output[0] = up, down
        nodes.append(node)
        nodes.append(onnx.helper.make_node("Cast", [down], [target], name=f"{node.name}__from_fp32", to=half))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return wrapped


def export_component(name: str, model: str, out_dir: Path, dtype: torch.dtype, dims: dict,
                     verbose: bool = False, wrapper: torch.nn.Module | None = None) -> Path:
    """Export graph `name` to `out_dir/name/model.onnx` and return the path; `verbose`: the exporter's
    own progress lines too. `wrapper`: a wrapper built already (an FP8-calibrated one), else it is
    loaded from `model`. A wrapper with ModelOpt's FP8 quantizers is written with FP8 Q/DQ (fp8.py)."""
    spec = graph_specs(dims)[name]
    wrapper = wrapper if wrapper is not None else C.build(name, model, dtype)
    quantized = any(n.endswith("weight_quantizer") for n, _ in wrapper.named_modules())
    args = sample_inputs(name, dims, dtype)
    large = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > LARGE_GRAPH_BYTES
    path = out_dir / name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    chunked = C.query_chunked_attention() if GRAPHS[name].sliced_attention else contextlib.nullcontext()
    quantizers = fp8.export_mode() if quantized else contextlib.nullcontext()
    with torch.no_grad(), C.float32_rope(), chunked, quantizers:
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=fp8.FP8_OPSET if quantized else OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes(spec), external_data=large, optimize=True, verbose=verbose,
            custom_translation_table=fp8.translation_table() if quantized else None,
        )
    for stale in path.parent.glob("model.onnx*"):
        stale.unlink()
    if quantized:  # the weights stored as FP8 in the graph: 1 byte per weight in the file and in TensorRT's parse
        proto = program.model_proto  # the exported graph, weights included, in memory: written once below
        fp8.store_fp8_weights(proto)
        onnx.save(proto, str(path), save_as_external_data=large, location="model.onnx.data")
    else:
        program.save(str(path), external_data=large)
    _finish_graph(path, spec)
    return path


def export_all(model: str, out_dir: str | Path, dtype: str = "fp32", components=COMPONENTS, log=print,
               verbose: bool = False, quantize: str | None = None, calibration: dict | None = None) -> dict:
    """Export `components` of `model`; `quantize="fp8"`: the text encoder and the transformer graphs
    with FP8 Q/DQ, calibrated first (fp8.quantize_pipeline with `calibration`'s size, side, steps)."""
    out_dir = Path(out_dir)
    dims = read_model_dims(model)
    wrappers = _fp8_wrappers(model, DTYPES[dtype], components, calibration or {}, log) if quantize == "fp8" else {}
    paths = {}
    for index, name in enumerate(components, 1):
        start = time.perf_counter()
        flavor = f"{dtype}, FP8 linear layers" if name in wrappers else dtype
        log(f"[{index}/{len(components)}] exporting {name} ({flavor}) ...", flush=True)
        paths[name] = export_component(name, model, out_dir, DTYPES[dtype], dims, verbose, wrappers.get(name))
        log(f"[{index}/{len(components)}] {name} -> {paths[name]} ({time.perf_counter() - start:.1f} s)", flush=True)
    return paths


def _fp8_wrappers(model: str, dtype: torch.dtype, components, calibration: dict, log) -> dict:
    """The FP8 graphs' wrappers around one calibrated pipeline's text encoder and transformer."""
    wanted = [name for name in components if name in FP8_ENGINES]
    if not wanted:
        return {}
    pipe = load_pipeline(model, dtype)
    counts = fp8.quantize_pipeline(pipe, log=log, **calibration)
    log(f"FP8 linear layers: {counts['text_encoder']} in the text encoder, {counts['transformer']} in the "
        "transformer (the rest kept in the export dtype)", flush=True)
    modules = {"text_encoder": pipe.text_encoder, "transformer": pipe.transformer}
    return {name: C.WRAPPERS[name](modules[GRAPHS[name].module]).eval() for name in wanted}
