"""python -m flux2_serving.export.build_engines: one TensorRT engine per exported ONNX graph.

A thin layer over the TensorRT Python API (10 and 11): strongly typed networks (precision
comes from the ONNX types: export bf16 graphs for production), optimization profiles
derived from the serving envelope (envelope.py: one per engine, two for the VAE encoder,
whose references are bounded by area), weight streaming (BuilderFlag.WEIGHT_STREAMING) for the
engines a memory tier streams (--tier: contract/tiers.py `streamed`; TensorRT requires a strongly typed
network for it, which every network here is), a shared timing cache, and
engine and timing cache names that carry the TensorRT version and the GPU's compute
capability, because a plan only loads on the TensorRT version and GPU architecture that
built it. Build engines with the same TensorRT as the Triton server that loads them
(docker/engines.Dockerfile: NVIDIA's TensorRT container of the serving release).

Standard library + tensorrt only (no torch, diffusers or onnx), so it runs in that container
as it is. Plans are written through a temporary file and renamed: a crash never leaves a
truncated plan under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE, ServingEnvelope, engine_profiles
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.manifest import BUILD_RECORD, MissingManifest
from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.contract.specs import GraphSpec
from flux2_serving.contract.tiers import BY_NAME as TIERS

WHERE = ("run it on a GPU host with the TensorRT of the serving Triton, e.g. docker/engines.Dockerfile: NVIDIA's "
         "TensorRT container of the release of the serving tritonserver container "
         "(nvcr.io/nvidia/tritonserver:<release>-py3)")


class MissingRequirement(RuntimeError):
    pass


class TimingCacheRejected(RuntimeError):
    pass


def engine_name(component: str, trt_version: str, compute_capability: str) -> str:
    return f"{component}.trt{trt_version}.sm{compute_capability}.plan"


def timing_cache_name(trt_version: str, compute_capability: str) -> str:
    """A timing cache from another TensorRT version or GPU is useless or rejected: name it after both."""
    return f"timing.trt{trt_version}.sm{compute_capability}.cache"


WRITE_CHUNK = 1 << 30  # one write(2) moves at most ~2 GiB on Linux


def write_buffer(path: Path, buffer) -> int:
    """Write a buffer-protocol object (TensorRT's IHostMemory, bytes, bytearray) to `path` without
    copying it (a plan of 18 GB is not held twice in host RAM), through a temporary file in the same
    directory renamed onto `path`, so a crash never leaves a truncated file under the final name.
    Returns the number of bytes written."""
    path = Path(path)
    view = memoryview(buffer).cast("B")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb", buffering=0) as f:
            written = 0
            while written < view.nbytes:
                written += f.write(view[written:written + WRITE_CHUNK])
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        view.release()
    return written


def apply_timing_cache(config, path: Path, trt_version: str, compute_capability: str):
    """Load the timing cache at `path` (a new, empty one if absent) into an IBuilderConfig.

    TensorRT 10's set_timing_cache returns False when it rejects a cache (ignore_mismatch=False: one
    written by another TensorRT version or GPU); building on would silently re-time every layer."""
    path = Path(path)
    cache = config.create_timing_cache(path.read_bytes() if path.exists() else b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        what = f"timing cache {path}" if path.exists() else f"a new, empty timing cache (for {path})"
        raise TimingCacheRejected(
            f"{what} was not accepted by TensorRT {trt_version} on sm{compute_capability} (built by another "
            f"TensorRT version or GPU?); delete it or pass --timing-cache NEW")
    return cache


def import_tensorrt():
    try:
        import tensorrt as trt  # optional, only on GPU hosts
    except ImportError as exc:
        raise MissingRequirement(f"TensorRT Python package not found ({exc}); {WHERE}") from exc
    return trt


def compute_capability() -> str:
    """'90' for an H100, read with nvidia-smi (present wherever an NVIDIA driver is)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0].replace(".", "")
    raise MissingRequirement(f"no NVIDIA GPU visible (nvidia-smi missing or failing); {WHERE}")


ATTENTION_MARKS = ("mha", "attention")  # fused multi-head attention kernels ("mha", "fmha", "_attention")
FOREIGN_MARKS = ("myelin", "foreignnode")  # Myelin-compiled regions (TensorRT fuses attention inside them)


def layer_summary(trt, engine) -> dict:
    """Counts from TensorRT's engine inspector (`polygraphy inspect model PLAN --show layers`). Per-layer types
    and precisions are there only when the engine was built with ProfilingVerbosity.DETAILED; else names."""
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    # TensorRT 10 wraps the layers in {"Layers": [...]}; TensorRT 11 changed the inspector's JSON and its
    # top-level key is not confirmed by any source read (Polygraphy reads per-layer keys only): take a bare
    # list too.
    layers = info.get("Layers", []) if isinstance(info, dict) else info
    detailed = bool(layers) and isinstance(layers[0], dict)
    texts = [json.dumps(layer).lower() if detailed else str(layer).lower() for layer in layers]

    def fp32(layer):
        outs = layer.get("Outputs", [])
        return any("FP32" in (o.get("Format/Datatype") or o.get("Datatype") or "").upper() for o in outs)

    return {"layers": len(layers), "attention": sum(any(m in t for m in ATTENTION_MARKS) for t in texts),
            "myelin": sum(any(m in t for m in FOREIGN_MARKS) for t in texts),
            "fp32_layers": sum(map(fp32, layers)) if detailed else None, "detailed": detailed}


def summary_line(plan: Path, s: dict) -> str:
    fp32 = (f"{s['fp32_layers']} with FP32 outputs" if s["detailed"]
            else "precisions unknown (built without ProfilingVerbosity.DETAILED)")
    return (f"{plan.name}: {s['layers']} layers, {s['attention']} fused attention (mha/fmha/attention), "
            f"{s['myelin']} Myelin foreign nodes, {fp32}")


RECORD = BUILD_RECORD  # OUT/build_record.json: what each built engine needs, for the memory plan


def reset_peak_rss() -> None:
    """Start a new peak of this process's resident memory (Linux: writing 5 to /proc/self/clear_refs resets
    VmHWM); elsewhere the peak stays the process's own since it started."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_bytes() -> int:
    """The builder process's peak resident memory since reset_peak_rss (VmHWM), else since it started."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def engine_record(engine, plan_path: Path, plan_bytes: int, trt_version: str, sm: str) -> dict:
    """What a deserialized engine reports about itself: the execution context's device memory at the
    largest profile maximum (device_memory_size_v2 from TensorRT 10.1, else device_memory_size; each
    of Triton's contexts, one per profile, reserves it), its profile count and the weights it could
    stream (0 unless built for weight streaming)."""
    device_memory = getattr(engine, "device_memory_size_v2", None)
    if device_memory is None:
        device_memory = engine.device_memory_size
    return {"plan": plan_path.name, "tensorrt": trt_version, "sm": sm, "plan_bytes": plan_bytes,
            "device_memory_bytes": int(device_memory), "profiles": int(engine.num_optimization_profiles),
            "streamable_weights_bytes": int(getattr(engine, "streamable_weights_size", 0) or 0)}


def update_record(out: Path, component: str, record: dict) -> Path:
    """Add one engine's record to OUT/build_record.json (written through a temporary file)."""
    path = Path(out) / RECORD
    records = json.loads(path.read_text()) if path.exists() else {}
    records[component] = record
    write_buffer(path, (json.dumps(records, indent=2) + "\n").encode())
    return path


def build_engine(trt, onnx_path: Path, plan_path: Path, profiles: list[dict], timing_cache: Path, sm: str,
                 log, weight_streaming: bool = False) -> dict:
    """Build one plan with `profiles` (envelope.engine_profiles, in profile order) and return its record.
    `weight_streaming`: build it so that its weights can stream from host memory at run time (the
    component runner's tensorrt_streamed runtime sets the budget)."""
    reset_peak_rss()  # this engine's own peak, not the largest of the engines built before it in this process
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    # Strongly typed: precision from the ONNX types; TensorRT 10 needs it for weight streaming, TensorRT 11
    # makes every network strongly typed (the flag stays, deprecated).
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif weight_streaming and int(trt.__version__.split(".")[0]) < 11:
        raise MissingRequirement(f"TensorRT {trt.__version__} has no strongly typed networks, which weight "
                                 f"streaming needs; {WHERE}")
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    # Layer names, types and precisions in the engine inspector (flux2_serving.export.engine_check reports which
    # attention fused and which layers run in fp32); costs a little plan size, no speed.
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if weight_streaming:
        config.set_flag(trt.BuilderFlag.WEIGHT_STREAMING)
    apply_timing_cache(config, timing_cache, trt.__version__, sm)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build {plan_path.name} (see the log above)")
    size = write_buffer(plan_path, serialized)
    write_buffer(timing_cache, config.get_timing_cache().serialize())
    # Release what the build needed before deserializing: the parser holds the ONNX weights and the network
    # refers to them (~18 GB each at 9B in bf16); kept, they and the plan and the engine would all be alive at
    # once (~55 GB of host RAM against the runbook's 64 GB).
    del parser, network, config, builder
    # Deserialize once to read what the engine needs at run time (the memory plan's measured rows).
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    del serialized
    record = engine_record(engine, plan_path, size, trt.__version__, sm)
    record["layers"] = layer_summary(trt, engine)  # which attention fused (the memory plan assumes it)
    del engine
    record["builder_peak_rss_bytes"] = peak_rss_bytes()
    log(f"  wrote {plan_path} ({size / 2**20:.1f} MiB; context memory {record['device_memory_bytes'] / 2**30:.2f} GiB; "
        f"builder peak RSS {record['builder_peak_rss_bytes'] / 2**30:.1f} GiB)")
    if weight_streaming:
        streamable = record["streamable_weights_bytes"]
        log(f"  weight streaming: {streamable / 2**30:.2f} GiB of streamable weights"
            + ("" if streamable else " (WARNING: none: the tensorrt_streamed runtime will refuse this plan)"))
    log(f"  {summary_line(plan_path, record['layers'])}")
    return record


def describe_profiles(specs: dict[str, GraphSpec], envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> str:
    lines = []
    for name, spec in specs.items():
        lines.append(f"{name}:")
        profiles = engine_profiles(spec, envelope)
        for index, shapes in enumerate(profiles):
            if len(profiles) > 1:
                lines.append(f" profile {index} of {len(profiles)}:")
            for tensor, (lo, opt, hi) in shapes.items():
                lines.append(f"  {tensor:<15} min {list(lo)}  opt {list(opt)}  max {list(hi)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.export.build_engines", __doc__)
    parser.add_argument("--onnx-dir", required=True,
                        help="output of `python -m flux2_serving.export` (has manifest.json)")
    parser.add_argument("--engines-dir", "--out", dest="out", default="build/engines",
                        help="folder for the .plan files (default %(default)s)")
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, metavar="NAME",
                        help="subset to build (default: every graph in the manifest)")
    parser.add_argument("--timing-cache", default=None,
                        help=f"timing cache file (default OUT/{timing_cache_name('<trt>', '<sm>')})")
    parser.add_argument("--dry-run", action="store_true", help="print the profiles and engine names; build nothing")
    parser.add_argument("--tier", choices=tuple(TIERS), default=None,
                        help="memory tier whose envelope sets the profiles and whose streamed engines are built "
                             "for weight streaming (contract/tiers.py; default: the shipped envelope, the "
                             "80gb-bf16 tier's). The FP8 tiers take FP8 graphs: export --dtype bf16 --quantize fp8")
    args = parser.parse_args(argv)
    envelope = TIERS[args.tier].envelope if args.tier else DEFAULT_ENVELOPE
    streamed = TIERS[args.tier].streamed if args.tier else ()

    onnx_dir, out = Path(args.onnx_dir), Path(args.out)
    try:
        manifest = read_manifest(onnx_dir)
        names = args.components or list(manifest.paths)
        specs = {n: manifest.specs[n] for n in names}
        print(f"serving envelope{f' of tier {args.tier}' if args.tier else ''}: {envelope}")
        print(describe_profiles(specs, envelope))
        streaming = [name for name in names if name in streamed]
        if streaming:
            print(f"weight streaming (tier {args.tier}): {', '.join(streaming)} built with "
                  "BuilderFlag.WEIGHT_STREAMING, served by the component runner's tensorrt_streamed runtime")
        if args.dry_run:
            for name in names:
                how = " for weight streaming" if name in streamed else ""
                print(f"would build {out / engine_name(name, '<trt>', '<sm>')}{how} from "
                      f"{onnx_dir / manifest.paths[name]}")
            print(f"timing cache: {args.timing_cache or out / timing_cache_name('<trt>', '<sm>')}")
            return 0
        trt = import_tensorrt()
        sm = compute_capability()
    except (MissingRequirement, MissingManifest) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    out.mkdir(parents=True, exist_ok=True)
    timing_cache = Path(args.timing_cache) if args.timing_cache else out / timing_cache_name(trt.__version__, sm)
    for index, name in enumerate(names, 1):
        plan = out / engine_name(name, trt.__version__, sm)
        print(f"[{index}/{len(names)}] building {plan.name} ...", flush=True)
        start = time.perf_counter()
        try:
            record = build_engine(trt, onnx_dir / manifest.paths[name], plan,
                                  engine_profiles(specs[name], envelope), timing_cache, sm, print,
                                  weight_streaming=name in streamed)
            update_record(out, name, record)
        except (TimingCacheRejected, MissingRequirement) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"[{index}/{len(names)}] {name} built in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
