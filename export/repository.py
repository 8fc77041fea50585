"""python -m export.repository: assemble a servable Triton model repository.

  OUT/flux2_klein_kv/       the public BLS model (sources from model_repository/flux2_klein_kv,
                            plus the tokenizer, scheduler config and export manifest)
  OUT/<component>/          text_encoder, vae_encoder, transformer_prefill, transformer_cached,
                            vae_decoder: config.pbtxt from the declared I/O spec, and either
                            1/model.plan (--backend tensorrt) or 1/model.onnx served by
                            onnxruntime in a Python-backend model (--backend onnxruntime)
  OUT/reference_kv_cache/   one instance holding reference K/V shared by all BLS instances
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .envelope import DEFAULT_ENVELOPE
from .specs import spec_from_manifest
from .triton_config import BACKENDS, TRITON_TYPES, component_config

SOURCES = Path(__file__).resolve().parent.parent / "model_repository"
BLS = "flux2_klein_kv"


CACHE = "reference_kv_cache"
# Byte budget of the shared reference K/V cache. 8 GiB holds four 1024x1024 single-reference
# entries at 9B in bf16 (2 GiB each, DESIGN.md section 3), or one entry of 4 such references;
# next to ~44 GB of engines an 80 GB GPU keeps room for it and the activations (DESIGN.md section 7).
REFERENCE_CACHE_BYTES = 8 * 2**30


def _parameters(params: dict) -> str:
    return "\n".join(f'parameters {{\n  key: "{k}"\n  value: {{ string_value: "{v}" }}\n}}' for k, v in params.items())


def cache_config(device: str, dtype: str, cache_bytes: int = REFERENCE_CACHE_BYTES) -> str:
    """The single-instance model holding the reference K/V shared by all BLS instances."""
    kv_type = TRITON_TYPES[dtype]
    params = {"device": device, "reference_cache_bytes": cache_bytes,
              "FORCE_CPU_ONLY_INPUT_TENSORS": "no" if device.startswith("cuda") else "yes"}
    return (f'name: "{CACHE}"\nbackend: "python"\nmax_batch_size: 0\n'
            'input [\n  {\n    name: "key"\n    data_type: TYPE_STRING\n    dims: [1]\n  },\n'
            f'  {{\n    name: "ref_kv"\n    data_type: {kv_type}\n    dims: [-1, -1, -1, -1, -1]\n    optional: true\n  }}\n]\n'
            'output [\n  {\n    name: "hit"\n    data_type: TYPE_BOOL\n    dims: [1]\n  },\n'
            f'  {{\n    name: "cached_kv"\n    data_type: {kv_type}\n    dims: [-1, -1, -1, -1, -1]\n  }}\n]\n'
            "# One instance: one cache for every BLS instance.\n"
            f"instance_group [\n  {{\n    count: 1\n    kind: KIND_CPU\n  }}\n]\n{_parameters(params)}\n")


def bls_config(device: str, instances: int, text_tokens: int = DEFAULT_ENVELOPE.text_len) -> str:
    env = DEFAULT_ENVELOPE
    params = {
        "device": device,
        # Prompt length in tokens (padded), as the pipeline's max_sequence_length; 512 for the real model.
        "max_sequence_length": text_tokens,
        "max_references": env.max_references,
        "min_side": env.output_side[0],
        "max_side": env.output_side[2],
        "default_side": env.output_side[1],
        "max_images": env.batch[2],
        "max_steps": 50,
        "max_input_pixels": 4096 * 4096,
        # GPU tensors from the client or other models stay on the device (DLPack).
        "FORCE_CPU_ONLY_INPUT_TENSORS": "no" if device.startswith("cuda") else "yes",
    }
    optional = [("image", "TYPE_STRING", [-1]), ("height", "TYPE_INT32", [1]), ("width", "TYPE_INT32", [1]),
                ("seed", "TYPE_INT64", [1]), ("num_images_per_prompt", "TYPE_INT32", [1]),
                ("num_inference_steps", "TYPE_INT32", [1]), ("reuse_reference_cache", "TYPE_BOOL", [1])]
    inputs = ['  {\n    name: "prompt"\n    data_type: TYPE_STRING\n    dims: [1]\n  }']
    inputs += [f'  {{\n    name: "{n}"\n    data_type: {t}\n    dims: {d}\n    optional: true\n  }}'
               for n, t, d in optional]
    parameters = _parameters(params)
    return (f'name: "{BLS}"\nbackend: "python"\nmax_batch_size: 0\n'
            "input [\n" + ",\n".join(inputs) + "\n]\n"
            'output [\n  {\n    name: "images"\n    data_type: TYPE_UINT8\n    dims: [-1, -1, -1, 3]\n  },\n'
            '  {\n    name: "png"\n    data_type: TYPE_STRING\n    dims: [-1]\n  }\n]\n'
            f"instance_group [\n  {{\n    count: {instances}\n    kind: KIND_CPU\n  }}\n]\n{parameters}\n")


def _find_engine(engines_dir: Path, component: str) -> Path:
    plans = sorted(engines_dir.glob(f"{component}.trt*.plan"))
    if len(plans) != 1:
        raise SystemExit(f"error: expected one {component}.trt*.plan in {engines_dir}, found {len(plans)}")
    return plans[0]


def assemble(onnx_dir, checkpoint, out, backend="onnxruntime", engines_dir=None, device="cpu",
             bls_instances=2, threads=1, text_tokens=DEFAULT_ENVELOPE.text_len,
             cache_bytes=REFERENCE_CACHE_BYTES) -> Path:
    onnx_dir, out = Path(onnx_dir), Path(out)
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    if out.exists():
        shutil.rmtree(out)
    for name, entry in manifest["graphs"].items():
        version = out / name / "1"
        version.mkdir(parents=True)
        config = component_config(spec_from_manifest(name, entry), manifest["dtype"], backend)
        if backend == "tensorrt":
            shutil.copy(_find_engine(Path(engines_dir), name), version / "model.plan")
        else:
            for graph_file in (onnx_dir / entry["path"]).parent.glob("model.onnx*"):
                shutil.copy(graph_file, version / graph_file.name)
            shutil.copy(SOURCES / "onnxruntime_runner" / "model.py", version / "model.py")
            config += _parameters({"intra_op_threads": threads}) + "\n"
        (out / name / "config.pbtxt").write_text(config)

    bls = out / BLS / "1"
    shutil.copytree(SOURCES / BLS / "1", bls, ignore=shutil.ignore_patterns("__pycache__"))
    local = Path(_local_checkpoint(checkpoint))
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(local / part, bls / part)
    (bls / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out / BLS / "config.pbtxt").write_text(bls_config(device, bls_instances, text_tokens))
    shutil.copytree(SOURCES / CACHE / "1", out / CACHE / "1", ignore=shutil.ignore_patterns("__pycache__"))
    (out / CACHE / "config.pbtxt").write_text(cache_config(device, manifest["dtype"], cache_bytes))
    return out


def _local_checkpoint(checkpoint: str) -> str:
    """A local directory for `checkpoint` (downloads only the small tokenizer/scheduler files)."""
    if Path(checkpoint).is_dir():
        return checkpoint
    from huggingface_hub import snapshot_download

    return snapshot_download(checkpoint, allow_patterns=["tokenizer/*", "scheduler/*"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.repository", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--onnx-dir", required=True, help="output of `python -m export` (has manifest.json)")
    parser.add_argument("--checkpoint", required=True, help="the checkpoint exported (tokenizer, scheduler)")
    parser.add_argument("--out", default="build/model_repository", help="repository to write (default %(default)s)")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="tensorrt (production, GPU) or onnxruntime (CPU, Python backend)")
    parser.add_argument("--engines-dir", default="build/engines", help="TensorRT plans (with --backend tensorrt)")
    parser.add_argument("--device", default="cpu", help="device the BLS computes on: cpu or cuda:N")
    parser.add_argument("--bls-instances", type=int, default=2, help="BLS instances (overlapping requests)")
    parser.add_argument("--reference-cache-bytes", type=int, default=REFERENCE_CACHE_BYTES,
                        help="byte budget of the shared reference K/V cache (default %(default)s = 8 GiB; 0 disables)")
    args = parser.parse_args(argv)
    out = assemble(args.onnx_dir, args.checkpoint, args.out, args.backend, args.engines_dir, args.device,
                   args.bls_instances, cache_bytes=args.reference_cache_bytes)
    print(f"wrote Triton model repository ({args.backend}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
