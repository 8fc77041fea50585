"""python -m flux2_serving.export.engine_check: each built TensorRT engine against onnxruntime on the
same inputs (Polygraphy).

For every graph of an export (or --components) it records one set of inputs at the serving envelope's opt
shapes (--shapes min for a quick run): random normal floats, input_ids in [0, vocab_size), position ids laid
out as the pipeline lays them, a right-padded attention mask; saved in Polygraphy's JSON format (a list of
feed dicts, the DataLoader format: `polygraphy run --load-inputs OUT/<graph>.inputs.json` reads it). Then:

  onnxruntime half: polygraphy's OnnxrtRunner on the fp32 graph (CPU); its outputs must have the shapes of
    the I/O spec and be finite. onnxruntime has no CPU kernels for bf16 (and bf16 Conv is not valid ONNX at
    opset 18), so for a bf16/fp16 export it runs --reference-onnx-dir, an fp32 export of the same model, on
    the same input values (rounded to the engine's dtype).
  TensorRT half, when `tensorrt` imports, a GPU is visible and --engines-dir has the graph's plan for this
    TensorRT and GPU (build_engines.engine_name): polygraphy's TrtRunner on the plan, compare_accuracy against
    onnxruntime with the TOLERANCES of export/engine_check.py, and a layer summary from TensorRT's engine
    inspector. Without TensorRT, a GPU or the plans it exits 2 with one line saying what is missing: a check of
    engines that cannot see them does not pass. --onnxruntime-only runs the onnxruntime half alone (the
    recorded inputs and the reference outputs, e.g. on the CPU host before copying them to the GPU host).

What has run: the onnxruntime half (--onnxruntime-only), on the tiny fp32 export (tests/test_engine_check.py).
What has not: the TensorRT half, written to Polygraphy 0.53.6's source; no TensorRT or GPU on the development
machines.

Writes OUT/report.json; exit 1 when a graph fails either half, 2 on a usage error. Needs polygraphy,
onnxruntime and numpy (requirements.txt), plus tensorrt and a GPU for the TensorRT half, plus torch for bf16
engines (Polygraphy feeds bf16 only as torch tensors): run it with the venv's python on the GPU host after
`pip install tensorrt==<the version that built the plans>`, or in NVIDIA's TensorRT container after
`pip install polygraphy==0.53.6 onnxruntime` (fp32/fp16 engines only: it has no torch). `make engine-check`
runs the venv's python.
"""

from __future__ import annotations

import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
from polygraphy.backend.common import BytesFromPath
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.backend.trt import EngineFromBytes, TrtRunner
from polygraphy.comparator import Comparator, IterationResult, RunResults, SimpleCompareFunc
from polygraphy.json import save_json
from polygraphy.logger import G_LOGGER

from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE, engine_profiles, shape_range
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.manifest import MissingManifest
from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.export.build_engines import (
    MissingRequirement,
    compute_capability,
    engine_name,
    layer_summary,
    summary_line,
)
from flux2_serving.modeling.latent_layout import grid_ids, reference_ids, text_ids

# (check, atol, rtol) per export dtype, then per graph ("*": the rest). Polygraphy's checks: "elemwise" fails an
# element off by more than atol AND by more than rtol x |onnxruntime's value|; "mean" checks the mean abs / rel
# error the same way. Not yet measured on a GPU: adjust here after the first run on the 9B engines.
TOLERANCES = {
    # fp32 ONNX in, fp32 engine: only kernel order differs. TensorRT uses TF32 (10 mantissa bits) for fp32
    # matmuls/convs on Ampere and newer by default: a failure near 1e-3 is that, not a broken engine.
    "fp32": {"*": ("elemwise", 1e-3, 1e-3)},
    "fp16": {"*": ("elemwise", 1e-2, 1e-2)},  # 11 mantissa bits: one rounding is within 2^-11 ~ 5e-4
    # bf16 has 8 mantissa bits: one rounding is off by up to 2^-9 ~ 2e-3, and the reference is the fp32 graph,
    # so the engine's rounded weights and activations compound over every layer; over millions of elements
    # some always exceed any per-element bound, so the mean error is checked (max abs/rel are reported too).
    "bf16": {"text_encoder": ("mean", 2e-2, 2e-2), "transformer_prefill": ("mean", 2e-2, 2e-2),
             "transformer_cached": ("mean", 2e-2, 2e-2), "*": ("mean", 3e-2, 3e-2)},
}
SHAPE_INDEX = {"min": 0, "opt": 1}


def tolerance(dtype: str, component: str) -> tuple[str, float, float]:
    table = TOLERANCES[dtype]
    return table.get(component, table["*"])


def _mask(shape) -> np.ndarray:
    """The second half of every prompt padded (on the right, as the pipeline's tokenizer pads)."""
    return np.broadcast_to(np.arange(shape[1]) < max(1, shape[1] // 2), shape).astype(np.int64)


def record_inputs(spec, dims: dict, shapes: str, seed: int = 0) -> OrderedDict:
    """One feed dict of graph `spec` at the envelope's `shapes` (min or opt), float inputs in float32.
    The numpy twin of onnx_export.sample_inputs (which imports torch)."""
    rng = np.random.default_rng(seed)
    special = {
        "input_ids": lambda shape: rng.integers(0, dims.get("vocab_size", 256), shape, dtype=np.int64),
        "attention_mask": _mask,
        "image": lambda shape: rng.uniform(-1, 1, shape).astype(np.float32),
        "timestep": lambda shape: rng.uniform(0, 1, shape).astype(np.float32),
        "ref_ids": lambda shape: reference_ids(shape[0]),
        "img_ids": lambda shape: grid_ids(shape[0], shape[1]),
        "txt_ids": lambda shape: text_ids(shape[0]),
    }
    feed = OrderedDict()
    for name, triple in engine_profiles(spec, DEFAULT_ENVELOPE)[0].items():  # opt is the same in every profile
        shape = triple[SHAPE_INDEX[shapes]]
        make = special.get(name, lambda shape: rng.standard_normal(shape, dtype=np.float32))
        feed[name] = np.ascontiguousarray(make(shape))
    return feed


def empty_axes_feed(spec, feed: OrderedDict) -> OrderedDict | None:
    """`feed` with every axis whose profile minimum is 0 cut to length 0 (the cached step's reference tokens:
    each text-to-image request runs it with zero reference tokens), or None if no axis may be empty. Run first,
    so that the path every text-to-image request takes is the first thing a TensorRT check shows."""
    lows = {name: triple[0] for name, triple in engine_profiles(spec, DEFAULT_ENVELOPE)[0].items()}
    if not any(0 in low for low in lows.values()):
        return None
    return OrderedDict((name, np.ascontiguousarray(value[tuple(slice(0, 0) if low == 0 else slice(None)
                                                               for low in lows[name])]))
                       for name, value in feed.items())


def round_to(feed: OrderedDict, dtype: str) -> OrderedDict:
    """The float inputs rounded to the engine's dtype (kept in float32): both runners see the same values."""
    def rnd(x):
        if x.dtype != np.float32 or dtype == "fp32":
            return x
        if dtype == "fp16":
            return x.astype(np.float16).astype(np.float32)
        bits = x.view(np.uint32)  # bf16: round to nearest even on the upper 16 bits
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)
    return OrderedDict((k, rnd(v)) for k, v in feed.items())


def engine_feed(feed: OrderedDict, dtype: str) -> OrderedDict:
    """The feed as the engine takes it: float16 arrays, or torch bfloat16 tensors (numpy has no bfloat16)."""
    if dtype == "fp32":
        return feed
    if dtype == "fp16":
        return OrderedDict((k, v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in feed.items())
    import torch  # only for bf16 engines

    return OrderedDict((k, torch.from_numpy(v).to(torch.bfloat16) if v.dtype == np.float32 else torch.from_numpy(v))
                       for k, v in feed.items())


def run(runner, feeds: list) -> RunResults:
    """polygraphy Comparator.run of one runner over a list of feed dicts, outputs as float32/int numpy arrays."""
    results = Comparator.run([runner], data_loader=feeds)
    as_numpy = RunResults()
    for name, iterations in results.items():
        as_numpy.append((name, [IterationResult(OrderedDict((k, _numpy(v)) for k, v in it.items()),
                                                it.runtime, name) for it in iterations]))
    return as_numpy


def _numpy(value) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if value.dtype == np.float16 else value
    return value.float().cpu().numpy() if value.is_floating_point() else value.cpu().numpy()  # torch


def compare(candidate: RunResults, reference: RunResults, check: tuple[str, float, float]) -> dict:
    """Comparator.compare_accuracy of `candidate` against `reference` (relative errors are relative to it):
    {"passed": bool, "outputs": {name: {max_abs, max_rel, mean_abs, mean_rel, passed}}}."""
    stat, atol, rtol = check
    results = Comparator.compare_accuracy([candidate, reference], compare_func=SimpleCompareFunc(
        atol=atol, rtol=rtol, check_error_stat=stat))
    outputs = {}
    for accuracy in results:
        for iterations in accuracy.values():
            for index, iteration in enumerate(iterations):  # with two feeds the first has the empty axes
                for name, res in iteration.items():
                    key = f"{name} (empty axes)" if index < len(iterations) - 1 else name
                    outputs[key] = {"max_abs": res.max_absdiff, "max_rel": res.max_reldiff,
                                    "mean_abs": res.mean_absdiff, "mean_rel": res.mean_reldiff, "passed": bool(res)}
    return {"check": {"stat": stat, "atol": atol, "rtol": rtol}, "outputs": outputs, "passed": bool(results)}


def tensorrt_status(engines_dir: Path):
    """(tensorrt module, compute capability, None) or (None, None, why the TensorRT half does not run)."""
    try:
        import tensorrt as trt  # optional, only on GPU hosts
    except ImportError:
        return None, None, "TensorRT not installed here"
    try:
        sm = compute_capability()
    except MissingRequirement:
        return None, None, f"TensorRT {trt.__version__} installed but no NVIDIA GPU visible"
    if not any(engines_dir.glob(f"*.trt{trt.__version__}.sm{sm}.plan")):
        return None, None, f"no plans of TensorRT {trt.__version__} on sm{sm} in {engines_dir}"
    return trt, sm, None


def check_component(name, manifest, reference, reference_dir, engines_dir, out, shapes, trt, sm, why_not) -> dict:
    spec, dims, dtype = manifest.specs[name], manifest.dims, manifest.dtype
    feed = round_to(record_inputs(spec, dims, shapes), dtype)
    empty = empty_axes_feed(spec, feed)
    feeds = [empty, feed] if empty is not None else [feed]
    inputs_path = out / f"{name}.inputs.json"
    save_json(feeds, str(inputs_path), description="recorded inputs")
    ranges = DEFAULT_ENVELOPE.profile_ranges(name)[0]
    expected = {t.name: list(shape_range(t.dims, ranges)[SHAPE_INDEX[shapes]]) for t in spec.outputs}
    report = {"inputs": str(inputs_path), "input_shapes": {k: list(v.shape) for k, v in feed.items()},
              "runners": [], "onnxruntime": {}, "tensorrt": {"ran": False, "reason": why_not}}
    if empty is not None:
        report["empty_axes_first"] = {k: list(v.shape) for k, v in empty.items() if 0 in v.shape}
    graph = reference_dir / reference.paths[name]
    ort_results = run(OnnxrtRunner(SessionFromOnnx(str(graph))), feeds)
    report["runners"].append("onnxruntime")
    iterations = ort_results[0][1]  # one per feed, the recorded one (opt or min shapes) last
    ort_outputs = {k: {"shape": list(v.shape), "expected_shape": expected[k], "dtype": str(v.dtype),
                       "finite": all(bool(np.isfinite(it[k]).all()) for it in iterations)}
                   for k, v in iterations[-1].items()}
    ort_ok = set(ort_outputs) == set(expected) and all(
        o["shape"] == o["expected_shape"] and o["finite"] for o in ort_outputs.values())
    report["onnxruntime"] = {"graph": str(graph), "outputs": ort_outputs, "passed": ort_ok}
    report["passed"] = ort_ok
    if trt is None:
        return report
    plan = engines_dir / engine_name(name, trt.__version__, sm)
    if not plan.exists():
        report["tensorrt"]["reason"] = f"no plan {plan}"
        return report
    engine = EngineFromBytes(BytesFromPath(str(plan)))()
    trt_results = run(TrtRunner(engine), [engine_feed(f, dtype) for f in feeds])
    report["runners"].append("tensorrt")
    comparison = compare(trt_results, ort_results, tolerance(dtype, name))
    summary = layer_summary(trt, engine)
    report["tensorrt"] = {"ran": True, "plan": str(plan), **comparison, "layer_summary": summary,
                          "summary": summary_line(plan, summary)}
    report["passed"] = ort_ok and comparison["passed"]
    return report


def _describe(name: str, r: dict) -> list[str]:
    ort = ", ".join(f"{k} {o['shape']}{'' if o['finite'] else ' NOT FINITE'}"
                    for k, o in r["onnxruntime"]["outputs"].items())
    lines = [f"{name}: onnxruntime {'ok' if r['onnxruntime']['passed'] else 'FAILED'} ({ort})"]
    t = r["tensorrt"]
    if not t["ran"]:
        lines.append(f"  tensorrt: not run ({t['reason']})")
        return lines
    check = t["check"]
    lines.append(f"  tensorrt vs onnxruntime ({check['stat']}, atol {check['atol']:g}, rtol {check['rtol']:g}): "
                 f"{'PASS' if t['passed'] else 'FAIL'}")
    lines += [f"    {k}: max abs {o['max_abs']:.3g}, max rel {o['max_rel']:.3g}, mean abs {o['mean_abs']:.3g} "
              f"{'ok' if o['passed'] else 'FAIL'}" for k, o in t["outputs"].items()]
    lines.append(f"  engine {t['summary']}")
    return lines


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.export.engine_check", __doc__)
    parser.add_argument("--onnx-dir", required=True, help="the export the engines were built from (has manifest.json)")
    parser.add_argument("--engines-dir", default="build/engines", help="folder of the .plan files")
    parser.add_argument("--reference-onnx-dir", help="fp32 export of the same model, for onnxruntime "
                        "(required when --onnx-dir is bf16 or fp16; default: --onnx-dir)")
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, metavar="NAME",
                        help="subset to check (default: every graph in the manifest)")
    parser.add_argument("--shapes", choices=tuple(SHAPE_INDEX), default="opt", help="envelope shapes of the inputs")
    parser.add_argument("--out", default="build/engine_check", help="folder for report.json and the recorded inputs")
    parser.add_argument("--onnxruntime-only", action="store_true",
                        help="run the onnxruntime half alone (no TensorRT needed); without it, a missing TensorRT, "
                             "GPU or plan is an error")
    parser.add_argument("--verbose", action="store_true", help="keep Polygraphy's own log")
    args = parser.parse_args(argv)

    onnx_dir, out, engines_dir = Path(args.onnx_dir), Path(args.out), Path(args.engines_dir)
    reference_dir = Path(args.reference_onnx_dir or args.onnx_dir)
    try:
        manifest, reference = read_manifest(onnx_dir), read_manifest(reference_dir)
    except (MissingManifest, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if reference.dtype != "fp32" or (reference.model, reference.dims) != (manifest.model, manifest.dims):
        print(f"error: onnxruntime needs fp32 graphs of the model of {onnx_dir} ({manifest.dtype}; no CPU bf16 "
              f"kernels): pass --reference-onnx-dir with an fp32 export of {manifest.model} (make export DTYPE=fp32)",
              file=sys.stderr)
        return 2
    names = args.components or list(manifest.paths)
    if args.onnxruntime_only:
        trt, sm, why_not = None, None, "--onnxruntime-only"
        print("onnxruntime half only (--onnxruntime-only)")
    else:
        trt, sm, why_not = tensorrt_status(engines_dir)
        if why_not:
            print(f"error: cannot check the engines: {why_not}; run it where TensorRT and the GPU that built the "
                  "plans are (docs/runbook.md, 'Checking the engines'), or pass --onnxruntime-only for the onnxruntime "
                  "half alone", file=sys.stderr)
            return 2
    if not args.verbose:
        G_LOGGER.module_severity = G_LOGGER.ERROR
    out.mkdir(parents=True, exist_ok=True)
    report = {"onnx_dir": str(onnx_dir), "reference_onnx_dir": str(reference_dir), "dtype": manifest.dtype,
              "shapes": args.shapes, "engines_dir": str(engines_dir),
              "tensorrt": {"ran": trt is not None, "reason": why_not}, "components": {}}
    for name in names:
        try:
            result = check_component(name, manifest, reference, reference_dir, engines_dir, out, args.shapes,
                                     trt, sm, why_not)
        except Exception as exc:  # a graph that cannot run is a failed check, reported
            result = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
            print(f"{name}: FAILED: {result['error']}")
        else:
            print("\n".join(_describe(name, result)), flush=True)
        report["components"][name] = result
    report["passed"] = all(r["passed"] for r in report["components"].values())
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'PASS' if report['passed'] else 'FAIL'}: report in {out / 'report.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
