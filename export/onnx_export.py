"""Export each component wrapper to ONNX with `torch.onnx.export(dynamo=True)`.

Dynamic axes come from the declared I/O spec (`specs.graph_specs`). torch.export
specialises any dimension whose sample size is 0 or 1, so every dynamic dimension is
traced at a size >= 2, and sizes are distinct so no two dimensions get unified by accident.
"""

from __future__ import annotations

import time
from pathlib import Path

import onnx
import torch
from torch.export import Dim

from . import components as C
from .loading import read_model_dims
from .specs import COMPONENTS, GraphSpec, graph_specs

OPSET = 18  # within TensorRT 10's parser range (opset 9-20), see trt_supported_ops.tsv
LARGE_GRAPH_BYTES = 1 << 30  # weights go to external data well before protobuf's 2 GB limit

# Trace-time sizes of the dynamic dims (all >= 2 and distinct).
TRACE = {"batch": 2, "text_len": 7, "lat_h": 3, "lat_w": 5, "n_ref": 10}
# Upper bounds of the dynamic dims; the serving envelope (envelope.py) is well inside them.
MAX = {"batch": 64, "text_len": 4096, "lat_h": 512, "lat_w": 512, "n_ref": 65536}


def sample_inputs(name: str, config: dict, dtype: torch.dtype, sizes: dict | None = None) -> tuple:
    """Random inputs of graph `name` at `sizes` (defaults: the trace sizes)."""
    s = {**TRACE, **(sizes or {})}
    g = torch.Generator().manual_seed(0)
    c = config["in_channels"]

    def randn(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    if name == "text_encoder":
        ids = torch.randint(0, config.get("vocab_size", 256), (s["batch"], s["text_len"]), generator=g)
        mask = torch.ones_like(ids)
        mask[0, s["text_len"] // 2 :] = 0  # right padding, as the pipeline's tokenizer pads
        return ids, mask
    if name == "vae_encoder":
        return (torch.rand(s["batch"], 3, 16 * s["lat_h"], 16 * s["lat_w"], generator=g) * 2 - 1).to(dtype),
    if name == "transformer_prefill":
        return randn(1, s["n_ref"], c), ref_ids_for(s["n_ref"])
    if name == "transformer_cached":
        b, h, w, t = s["batch"], s["lat_h"], s["lat_w"], s["text_len"]
        kv = tuple(randn(2, s["n_ref"], config["heads"], config["head_dim"]) for _ in range(config["kv_layers"]))
        img_ids = torch.stack(torch.meshgrid(torch.zeros(1, dtype=torch.long), torch.arange(h), torch.arange(w),
                                             torch.zeros(1, dtype=torch.long), indexing="ij"), dim=-1)
        txt_ids = torch.stack([torch.zeros(t, dtype=torch.long)] * 3 + [torch.arange(t)], -1)
        timestep = torch.rand(b, generator=g).to(dtype)
        return (randn(b, h, w, c), randn(b, t, 3 * config["text_hidden"]), timestep,
                img_ids.reshape(h, w, 4), txt_ids, *kv)
    if name == "vae_decoder":
        return randn(s["batch"], s["lat_h"], s["lat_w"], c),
    raise KeyError(name)


def ref_ids_for(n_ref: int) -> torch.Tensor:
    """Position ids of one reference of n_ref tokens laid out as a 1 x n_ref grid."""
    return torch.stack([torch.full((n_ref,), 10), torch.zeros(n_ref, dtype=torch.long),
                        torch.arange(n_ref), torch.zeros(n_ref, dtype=torch.long)], dim=-1)


def dynamic_shapes(spec: GraphSpec) -> tuple:
    """torch.export dynamic shapes of every input, in order, from the declared dims of `spec`."""
    n_ref_min = 0 if spec.name == "transformer_cached" else 1  # 0 = text-to-image; a prefill has references
    dims = {name: Dim(name, min=1, max=MAX[name]) for name in ("batch", "text_len", "lat_h", "lat_w")}
    dims["n_ref"] = Dim("n_ref", min=n_ref_min, max=MAX["n_ref"])
    # Reference pixels: multiples of 16 (the VAE downsamples 8x, then 2x2 patches).
    dims["height"] = 16 * Dim("ref_h", min=1, max=MAX["lat_h"])
    dims["width"] = 16 * Dim("ref_w", min=1, max=MAX["lat_w"])
    shapes = tuple({axis: dims[dim] for axis, dim in enumerate(tensor.dims) if isinstance(dim, str)}
                   for tensor in spec.inputs)
    if spec.name == "transformer_cached":  # forward(latents, ..., txt_ids, *ref_kv): the K/V are one varargs group
        return (*shapes[:5], shapes[5:])
    return shapes


def _name_dims(path: Path, spec: GraphSpec) -> None:
    """Give the graph's inputs and outputs the dimension names of the declared spec."""
    proto = onnx.load(str(path), load_external_data=False)
    for values, tensors in ((proto.graph.input, spec.inputs), (proto.graph.output, spec.outputs)):
        by_name = {t.name: t for t in tensors}
        for value in values:
            tensor = by_name[value.name]
            for dim, declared in zip(value.type.tensor_type.shape.dim, tensor.dims):
                if isinstance(declared, str):
                    dim.dim_param = declared
    onnx.save(proto, str(path))


def export_component(name: str, model: str, out_dir: Path, dtype: torch.dtype, dims: dict) -> Path:
    """Export graph `name` to `out_dir/name/model.onnx` and return the path."""
    spec = graph_specs(dims)[name]
    wrapper = C.build(name, model, dtype)
    args = sample_inputs(name, dims, dtype)
    large = sum(p.numel() * p.element_size() for p in wrapper.parameters()) > LARGE_GRAPH_BYTES
    path = out_dir / name / "model.onnx"
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), C.float32_rope():
        program = torch.onnx.export(
            wrapper, args, dynamo=True, opset_version=OPSET,
            input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs],
            dynamic_shapes=dynamic_shapes(spec), external_data=large, optimize=True,
        )
    for stale in path.parent.glob("model.onnx*"):
        stale.unlink()
    program.save(str(path), external_data=large)
    _name_dims(path, spec)
    return path


def export_all(model: str, out_dir: str | Path, dtype: str = "fp32", components=COMPONENTS, log=print) -> dict:
    from .loading import DTYPES

    out_dir = Path(out_dir)
    dims = read_model_dims(model)
    paths = {}
    for index, name in enumerate(components, 1):
        start = time.perf_counter()
        log(f"[{index}/{len(components)}] exporting {name} ({dtype}) ...", flush=True)
        paths[name] = export_component(name, model, out_dir, DTYPES[dtype], dims)
        log(f"[{index}/{len(components)}] {name} -> {paths[name]} ({time.perf_counter() - start:.1f} s)", flush=True)
    return paths
