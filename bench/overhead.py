"""python -m bench.overhead: the serving overhead of flux2_klein_kv, per request type, with the
BLS's own per-stage breakdown.

Overhead = the client's end-to-end latency minus the queue + compute time of every component
model (text_encoder, vae_encoder, transformer_prefill, transformer_cached, vae_decoder) from
Triton's own statistics for the same request: tokenization, reference decoding and
preprocessing, the cache key, the reference cache's lookups, noise and ids, the transfers of
tensors between processes, postprocessing, PNG encoding and the response. Sequential requests,
so nothing queues behind another request. The stage table is the BLS's metric
`flux2_bls_stage_seconds_total{stage}` over the same requests (component calls as
`call:<model>`: the BLS's side of the call, transfers included).

Default: the tiny checkpoint at 1024x1024, CPU, onnxruntime components, twice: with the BLS's
switchable cuts off ("before": no request caches, Pillow's default PNG level) and on ("after",
the shipped defaults); `make bench` runs it after bench.bench and writes both to BENCHMARKS.md.
Served as `make serve` serves: behind the gate, with self-repair on. Text-to-image is also sent
straight to tritonserver's own gRPC port behind the gate, which gives the gate's share; --no-gate
and --no-repair serve without them (to attribute a change; not written to BENCHMARKS.md).
"""

from __future__ import annotations

import contextlib
import functools
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpc
from PIL import Image

from bench.report import benchmark_parser, machine, parse_benchmark_args, publish
from flux2_serving.clients.api import Flux2Client, request_tensors
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.names import CACHE_MODEL
from flux2_serving.devtools.metrics import metric_by_label
from flux2_serving.devtools.pictures import synthetic_reference
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble

try:  # optional: the BLS falls back to Pillow without it, and so does the PNG comparison here
    import fpng
except ImportError:
    fpng = None

SIDE = 1024
CASES = {  # name -> (references, outputs requested)
    "text_to_image": (0, ("images",)),
    "text_to_image_direct": (0, ("images",)),  # the same, straight to tritonserver (not through the gate)
    "text_to_image_png": (0, ("images", "png")),
    "reference_hit": (1, ("images",)),
}
DIRECT = {"text_to_image_direct"}
CALLED = (*COMPONENTS, CACHE_MODEL)
LABELS = {"text_to_image": "text-to-image", "text_to_image_png": "text-to-image, `png` requested",
          "text_to_image_direct": "text-to-image, straight to tritonserver (not through the gate)",
          "reference_hit": "1 reference (1024^2 PNG), reference K/V cache hit"}


@functools.cache
def statistics_client(address: str) -> grpc.InferenceServerClient:
    """One client per server for the statistics: a new one per read opened (and later closed) a
    connection next to every timed request."""
    return grpc.InferenceServerClient(address)


def model_seconds(server, models) -> dict[str, float]:
    """{model: queue + compute seconds so far} from Triton's statistics (an admin API: `server`, a
    flux2_serving.server.launch.Running, holds the key)."""
    client = statistics_client(server.grpc)
    seconds = {}
    for model in models:
        stats = client.get_inference_statistics(model, headers=server.admin_headers("grpc")).model_stats[0]
        stats = stats.inference_stats
        parts = ("queue", "compute_input", "compute_infer", "compute_output")
        seconds[model] = sum(getattr(stats, part).ns for part in parts) / 1e9
    return seconds


def component_seconds(server) -> float:
    """Queue + compute time of every component model so far (Triton's statistics)."""
    return sum(model_seconds(server, COMPONENTS).values())


def stage_seconds(metrics_url: str) -> dict[str, float]:
    """{stage: seconds} the BLS has spent so far (all instances), from flux2_bls_stage_seconds_total."""
    return metric_by_label(metrics_url, "flux2_bls_stage_seconds_total", "stage")


def time_requests(server, send, repeats: int) -> tuple[list[float], list[float], dict[str, float]]:
    """`send()` `repeats` times, sequentially: each request's end-to-end seconds, its seconds outside
    the components (e2e minus their queue + compute in Triton's statistics), and the BLS's stages
    over all of them in ms per request. `server`: flux2_serving.server.launch.Running."""
    before = stage_seconds(server.metrics)
    e2e, outside = [], []
    for _ in range(repeats):
        components = component_seconds(server)
        start = time.perf_counter()
        send()
        e2e.append(time.perf_counter() - start)
        outside.append(e2e[-1] - (component_seconds(server) - components))
    stages = {stage: 1e3 * (seconds - before.get(stage, 0.0)) / repeats
              for stage, seconds in stage_seconds(server.metrics).items()}
    return e2e, outside, stages


def measure(server, repeats: int = 5, side: int = SIDE, log=print) -> list[dict]:
    """One row per case: median e2e and overhead (ms) over `repeats` sequential requests after a
    warm-up, and the mean per-request BLS stages (ms). `server`: flux2_serving.server.launch.Running."""
    reference = synthetic_reference((side, side), 90)
    rows = []
    direct = f"127.0.0.1:{server.upstream['grpc']}" if server.upstream else None  # tritonserver's own port
    with Flux2Client(server.grpc) as gated, Flux2Client(direct or server.grpc) as straight:
        for case, (refs, outputs) in CASES.items():
            if case in DIRECT and direct is None:
                continue  # no gate in front: nothing to go around
            client = straight if case in DIRECT else gated
            tensors = request_tensors("a lighthouse on a cliff at dusk", [reference] * refs, height=side, width=side,
                                      seed=3, num_inference_steps=4)
            client.infer(tensors, outputs)  # warm-up; with a reference, it also fills the cache
            models_before = model_seconds(server, CALLED)
            e2e, overhead, stages = time_requests(server, functools.partial(client.infer, tensors, outputs), repeats)
            # The BLS's wall time of a call, less the callee's own queue + compute: the transfers.
            inside = model_seconds(server, CALLED)
            for model in CALLED:
                call = stages.get(f"call:{model}", 0.0)
                if call > 0:
                    stages[f"transfer:{model}"] = call - 1e3 * (inside[model] - models_before[model]) / repeats
            rows.append({"case": case, "e2e_ms": 1e3 * statistics.median(e2e),
                         "overhead_ms": 1e3 * statistics.median(overhead),
                         "stages_ms": {k: v for k, v in stages.items() if v > 0}})
            log(f"{case}: e2e {rows[-1]['e2e_ms']:.0f} ms, outside the components {rows[-1]['overhead_ms']:.1f} ms")
    return rows


@contextlib.contextmanager
def tiny_server(onnx_dir, checkpoint, workdir: Path, gate: bool = True, repair: bool = True, **options):
    """tritonserver on an onnxruntime repository of the tiny checkpoint (assemble's defaults, 1 BLS
    instance so the stage metrics are one process's), behind the gate and self-repaired unless told
    otherwise (flux2_serving.server.launch.running); `options` go to flux2_serving.serving.repository.assemble."""
    repository = assemble(onnx_dir, checkpoint, workdir / "model_repository", backend="onnxruntime",
                          bls_instances=1, **options)
    with running(repository, log_file=workdir / "server.log", gate=gate, repair=repair) as server:
        yield server


def stage_table(columns: dict[str, list[dict]]) -> str:
    """Markdown: one row per BLS stage, one column per (label -> rows of measure()) and case."""
    heads, cells = [], []
    for label, rows in columns.items():
        if label not in ("before", "after", ""):
            continue
        for row in rows:
            if row["case"] in DIRECT:  # the BLS's stages do not depend on the way in
                continue
            heads.append(f"{label}: {row['case']}")
            cells.append(row["stages_ms"])
    stages = sorted({stage for column in cells for stage in column},
                    key=lambda s: (s.split(":")[0] in ("call", "transfer"), s.split(":")[-1], s))
    lines = ["| BLS stage (ms per request) | " + " | ".join(heads) + " |", "|---|" + "---|" * len(heads)]
    for stage in stages:
        lines.append(f"| {stage} | " + " | ".join(f"{column[stage]:.1f}" if stage in column else "-"
                                                 for column in cells) + " |")
    return "\n".join(lines)


def png_tradeoff(served, repeats: int = 5) -> list[dict]:
    """Encode time and size of the BLS's PNG encoders on a served 1024^2 image (a random model's: noise
    to a compressor, the worst case) and on a smooth synthetic picture (close to the best case)."""
    smooth = np.asarray(Image.open(io.BytesIO(synthetic_reference(served.shape[1::-1], 90))).convert("RGB"))
    encoders = {"pillow:6": None, "pillow:1": None, "fpng": None}
    if fpng is None:
        del encoders["fpng"]

    def encode(name, image):
        if name == "fpng":
            return fpng.from_ndarray(image)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG", compress_level=int(name.split(":")[1]))
        return buffer.getvalue()

    rows = []
    for picture, image in (("served (noise-like)", served), ("smooth synthetic", smooth)):
        for name in encoders:
            data = encode(name, image)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), image)  # lossless
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                encode(name, image)
                times.append(time.perf_counter() - start)
            rows.append({"picture": picture, "encoder": name, "ms": 1e3 * statistics.median(times),
                         "mib": len(data) / 2**20})
    return rows


BEFORE = {"request_cache_entries": 0, "png_encoder": "pillow:6"}  # the switchable cuts off
TARGETS_MS = {"text_to_image": "<= 15", "text_to_image_png": "<= 60 more than text-to-image",
              "reference_hit": "<= 30", "text_to_image_direct": "-"}


def share(row: dict) -> str:
    """Outside the components as a share of end to end."""
    return f"{100 * row['overhead_ms'] / row['e2e_ms']:.1f}%"


def markdown(args, runs: dict[str, list[dict]], seconds: float) -> str:
    before, after = ({row["case"]: row for row in runs[label]} for label in ("before", "after"))
    png_extra = {label: rows["text_to_image_png"]["overhead_ms"] - rows["text_to_image"]["overhead_ms"]
                 for label, rows in (("before", before), ("after", after))}
    lines = [
        "## Serving overhead at 1024x1024 (`make bench`: `python -m bench.overhead`)",
        "",
        f"Command: `{args.command}` ({seconds / 60:.1f} min). Machine: {machine()}. Tiny checkpoint, fp32, CPU, "
        f"onnxruntime components, one BLS instance, {SIDE}x{SIDE} output, 4 steps, sequential requests; medians "
        f"of {args.repeats} after a warm-up. Outside the components = client end-to-end latency minus the queue + "
        "compute time of text_encoder, vae_encoder, transformer_prefill, transformer_cached and vae_decoder in "
        "Triton's statistics for the same requests (in brackets: as a share of end to end). Served as `make serve` "
        "serves it: behind the gate (flux2_serving/server/gate.py), with self-repair on.",
        "",
        "*before*: the same code with its switchable cuts off (BLS parameters `request_cache_entries: 0`: no "
        "tokenizer cache, no first-level reference key; `png_encoder: pillow:6`, Pillow's default). Cuts without "
        "a switch are in both columns (uint8 postprocessing in tensor ops, a C-contiguous `images` output, one "
        "scheduler per instance); the measurement before any cut is in the note below this section.",
        "",
        "| request | e2e before (ms) | e2e after (ms) | outside the components, before (ms, share) | after (ms, share) "
        "| target |",
        "|---|---|---|---|---|---|",
    ]
    for case in CASES:
        if case in before and case in after:
            lines.append(f"| {LABELS[case]} | {before[case]['e2e_ms']:.0f} | {after[case]['e2e_ms']:.0f} | "
                         f"{before[case]['overhead_ms']:.1f} ({share(before[case])}) | "
                         f"{after[case]['overhead_ms']:.1f} ({share(after[case])}) | {TARGETS_MS[case]} |")
    if all("text_to_image_direct" in rows for rows in (before, after)):
        gate = {label: rows["text_to_image"]["overhead_ms"] - rows["text_to_image_direct"]["overhead_ms"]
                for label, rows in (("before", before), ("after", after))}
        lines += ["", f"The gate's share of text-to-image (through it minus straight to tritonserver, same server): "
                  f"{gate['before']:.1f} ms before and {gate['after']:.1f} ms after."]
    lines += ["", f"`png` requested costs {png_extra['before']:.1f} ms before and {png_extra['after']:.1f} ms after "
              "(difference of the two rows above).", "",
              "Where the time goes: the BLS's own stages (`flux2_bls_stage_seconds_total`), ms per request; "
              "`call:<model>` is the BLS's wall time of a call, `transfer:<model>` that less the callee's own "
              "queue + compute (the inter-process transfers and the call's bookkeeping).", "",
              stage_table(runs)]
    if runs.get("png"):
        lines += ["", f"PNG encoders on one {SIDE}x{SIDE} image, in this process (median of 5; every one lossless, "
                  "checked by decoding):", "", "| picture | encoder | ms | MiB |", "|---|---|---|---|"]
        lines += [f"| {r['picture']} | {r['encoder']} | {r['ms']:.1f} | {r['mib']:.2f} |" for r in runs["png"]]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.overhead", __doc__, "checkpoints/tiny", "build/onnx/tiny-fp32",
                              "the exported model (tokenizer, scheduler)")
    parser.add_argument("--repeats", type=int, default=5, help="timed requests per case")
    parser.add_argument("--no-gate", action="store_true", help="serve without the gate (implies --no-write)")
    parser.add_argument("--no-repair", action="store_true", help="serve without self-repair (implies --no-write)")
    args = parse_benchmark_args(parser, argv)
    serving = {"gate": not args.no_gate, "repair": not args.no_repair}

    started, runs = time.perf_counter(), {}
    for label, parameters in (("before", BEFORE), ("after", {})):
        with tempfile.TemporaryDirectory(prefix="flux2-overhead-") as tmp, \
                tiny_server(args.onnx_dir, args.checkpoint, Path(tmp), bls_parameters=parameters,
                           **serving) as server:
            print(f"[overhead] {label}: {parameters or 'defaults'}", flush=True)
            runs[label] = measure(server, args.repeats, log=lambda m: print(f"[overhead] {m}", flush=True))
            if label == "after":
                with Flux2Client(server.grpc) as client:
                    served = np.asarray(client.generate("a lighthouse on a cliff at dusk", height=SIDE, width=SIDE,
                                                        seed=3)[0])
    runs["png"] = png_tradeoff(served)
    text = markdown(args, runs, time.perf_counter() - started)
    publish('overhead', text, write=not args.no_write and all(serving.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
