"""python -m bench.front: what the OpenAI Images front (flux2_serving.front) adds per request at 1024x1024,
and a load run through it next to perf_analyzer's on Triton for the same workload.

One tiny-checkpoint server (as bench.overhead: fp32, CPU, onnxruntime components, one BLS instance)
and one front on its gRPC port, both on this machine. Every request is the same: the prompt of
perf.input_data's text_to_image case, 1024x1024, 4 steps, seed 1, one PNG.

Overhead: REPEATS sequential requests after one warm-up of each path, alternating Triton direct
(gRPC, flux2_serving.clients.api.Flux2Client asking for png, seed and notes: what the front asks
Triton for) and through the front (the official `openai` client, response_format b64_json,
output_format png, the image decoded to PNG bytes in the caller's hand): median and p90 of each,
front minus direct in ms and as a ratio, and the front's own share from its /metrics
(flux2_front_request_seconds minus flux2_front_triton_seconds over the same requests).

Load, at each concurrency with the same fixed request count: through the front with NVIDIA AIPerf
(endpoint type image_generation, its own venv made by `python -m bench.aiperf_provision`; the served
checkpoint's tokenizer for its token counts, so nothing is fetched from the Hub) and perf_analyzer
(perf.run, perf.provision) on Triton directly, each tool's CPU time beside it; and, since those two
are different tools on 2 shared cores, the same Python client on both paths as the control (threads
of `openai` clients through the front, of Flux2Client direct). Where AIPerf cannot run, the threads
through the front stand in for it and the section says why. `make bench` runs it after bench.overload.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bench import aiperf_provision
from bench.overhead import tiny_server
from bench.report import benchmark_parser, machine, parse_benchmark_args, publish
from flux2_serving.clients.api import Flux2Client, request_tensors
from flux2_serving.contract.names import BLS_MODEL
from flux2_serving.devtools.debian import ToolError, last_line
from flux2_serving.devtools.metrics import metric_by_label
from perf import input_data
from perf import run as perf_run
from perf.provision import provision as provision_perf_analyzer
from perf.provision import version as perf_analyzer_version

CASE = "text_to_image"
PROMPT = input_data.PROMPTS[CASE]
SIDE, STEPS, SEED = 1024, 4, 1
DIRECT_OUTPUTS = ("png", "seed", "notes")  # what the front asks Triton for when output_format is png
FRONT_PATH, DIRECT_PATH = "front (OpenAI Images API)", "Triton direct (gRPC)"
AIPERF, PERF_ANALYZER = "AIPerf", "perf_analyzer"
THREADS_FRONT, THREADS_DIRECT = "Python threads, `openai`", "Python threads, `Flux2Client`"
# front / direct ratios of the load table: (label, front tool, direct tool)
RATIOS = ((f"{AIPERF} / {PERF_ANALYZER}", AIPERF, PERF_ANALYZER),
          ("same client, threads", THREADS_FRONT, THREADS_DIRECT))
IMAGES_ENDPOINT = "/v1/images/generations"


def log(message: str) -> None:
    print(f"[front] {message}", flush=True)


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100), linear between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---------------------------------------------------------------- the two paths

def openai_client(front):
    from openai import OpenAI

    return OpenAI(base_url=front.url, api_key="unused", max_retries=0, timeout=900)


def front_sender(client, model_id: str):
    """A function sending the workload through the front; returns the PNG's bytes."""
    def send() -> bytes:
        response = client.images.generate(model=model_id, prompt=PROMPT, size=f"{SIDE}x{SIDE}", n=1,
                                          response_format="b64_json", output_format="png",
                                          extra_body={"seed": SEED, "num_inference_steps": STEPS})
        return base64.b64decode(response.data[0].b64_json)
    return send


def direct_sender(client: Flux2Client):
    """A function sending the same workload to Triton directly; returns the PNG's bytes."""
    tensors = request_tensors(PROMPT, height=SIDE, width=SIDE, seed=SEED, num_inference_steps=STEPS)

    def send() -> bytes:
        return bytes(client.infer(tensors, DIRECT_OUTPUTS).as_numpy("png").reshape(-1)[0])
    return send


def front_metrics(front) -> dict[str, float]:
    """The front's cumulative seconds and counts of image requests and of its Triton calls (its /metrics)."""
    host = front.root.split("://", 1)[1]
    requests = metric_by_label(host, "flux2_front_request_seconds_sum", "endpoint")
    request_count = metric_by_label(host, "flux2_front_request_seconds_count", "endpoint")
    return {"request_s": requests.get(IMAGES_ENDPOINT, 0.0), "requests": request_count.get(IMAGES_ENDPOINT, 0.0),
            "triton_s": sum(metric_by_label(host, "flux2_front_triton_seconds_sum", "outcome").values()),
            "triton_calls": sum(metric_by_label(host, "flux2_front_triton_seconds_count", "outcome").values())}


def measure_overhead(direct, via_front, front, repeats: int) -> dict:
    """`repeats` sequential requests alternating direct and front (direct first), after a warm-up of each:
    e2e seconds of each path, the front's own seconds per request from its metrics, and whether both
    paths gave the same PNG bytes."""
    same_png = direct() == via_front()  # warm-up of both; the same seed gives the same image
    before = front_metrics(front)
    times = {"direct": [], "front": []}
    for index in range(repeats):
        path, send = ("direct", direct) if index % 2 == 0 else ("front", via_front)
        start = time.perf_counter()
        send()
        times[path].append(time.perf_counter() - start)
        log(f"  {index + 1}/{repeats} {path}: {1e3 * times[path][-1]:.0f} ms")
    after = front_metrics(front)
    served = after["requests"] - before["requests"]
    calls = after["triton_calls"] - before["triton_calls"]
    return {"direct_s": times["direct"], "front_s": times["front"], "same_png": same_png,
            "front_request_s": (after["request_s"] - before["request_s"]) / served if served else None,
            "front_triton_s": (after["triton_s"] - before["triton_s"]) / calls if calls else None}


def overhead_summary(measured: dict) -> dict:
    """Medians, p90s, differences and ratio (ms) of measure_overhead's result."""
    direct, front = measured["direct_s"], measured["front_s"]
    summary = {"requests": (len(direct), len(front)),
               "direct_p50": 1e3 * statistics.median(direct), "direct_p90": 1e3 * percentile(direct, 90),
               "front_p50": 1e3 * statistics.median(front), "front_p90": 1e3 * percentile(front, 90),
               "direct_spread": 1e3 * (max(direct) - min(direct)), "same_png": measured["same_png"]}
    summary["overhead_p50"] = summary["front_p50"] - summary["direct_p50"]
    summary["overhead_p90"] = summary["front_p90"] - summary["direct_p90"]
    summary["ratio_p50"] = summary["front_p50"] / summary["direct_p50"]
    if measured["front_request_s"] is not None and measured["front_triton_s"] is not None:
        summary["inside_ms"] = 1e3 * measured["front_request_s"]
        summary["triton_call_ms"] = 1e3 * measured["front_triton_s"]
        summary["own_ms"] = summary["inside_ms"] - summary["triton_call_ms"]
        summary["outside_ms"] = 1e3 * statistics.mean(front) - summary["inside_ms"]
    return summary


# ---------------------------------------------------------------- load

@dataclass
class LoadRow:
    tool: str
    path: str
    concurrency: int
    requests: int
    throughput: float  # requests/s
    p50_ms: float
    p99_ms: float
    errors: int = 0
    tool_cpu_s: float | None = None  # CPU seconds the load tool used during the run (its processes)


def children_cpu_s() -> float:
    """CPU seconds of this process's finished children so far (a tool run with subprocess.run, its own
    subprocesses included once it waited for them)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def aiperf_command(aiperf: Path, base_url: str, model_id: str, tokenizer: str, prompts: Path, concurrency: int,
                   requests: int, artifacts: Path) -> list[str]:
    """AIPerf's command line for the workload through the front: endpoint type image_generation, the
    model's own fields (seed, num_inference_steps) and OpenAI's (size, output_format, response_format)
    as --extra-inputs, one warm-up request, no UI, no server-metrics scraping, no GPU telemetry."""
    extra = {"size": f"{SIDE}x{SIDE}", "seed": SEED, "num_inference_steps": STEPS, "output_format": "png",
             "response_format": "b64_json"}
    command = [str(aiperf), "profile", "--model", model_id, "--url", base_url, "--endpoint-type", "image_generation",
               "--input-file", str(prompts), "--custom-dataset-type", "single_turn", "--tokenizer", tokenizer]
    for name, value in extra.items():
        command += ["--extra-inputs", f"{name}:{value}"]
    return command + ["--concurrency", str(concurrency), "--request-count", str(requests),
                      "--warmup-request-count", "1", "--random-seed", "0", "--ui-type", "none",
                      "--no-server-metrics", "--no-gpu-telemetry", "--artifact-dir", str(artifacts)]


def parse_aiperf(path) -> dict:
    """Throughput, latency percentiles, counts and version from AIPerf's profile_export_aiperf.json
    (metrics as {"unit", "avg", "p50", "p99", ...}; request_count counts the successful requests,
    completed_request_count successes and errors)."""
    data = json.loads(Path(path).read_text())
    latency = data["request_latency"]
    if latency.get("unit", "ms") != "ms":
        raise ValueError(f"{path}: request_latency in {latency.get('unit')}, not ms")
    ok = int(data["request_count"]["avg"])
    completed = int(data.get("completed_request_count", {}).get("avg", ok))
    return {"version": data.get("aiperf_version"), "throughput": float(data["request_throughput"]["avg"]),
            "p50_ms": float(latency["p50"]), "p90_ms": float(latency["p90"]), "p99_ms": float(latency["p99"]),
            "requests": ok, "errors": completed - ok, "duration_s": float(data["benchmark_duration"]["avg"])}


def run_aiperf(aiperf: Path, front, model_id: str, tokenizer: str, concurrency: int, requests: int,
               out: Path) -> tuple[LoadRow, str]:
    """One AIPerf run through the front: (its row, its version). RuntimeError (one line) when it fails."""
    artifacts = out / f"aiperf_c{concurrency}"
    prompts = out / "prompts.jsonl"
    prompts.write_text(json.dumps({"text": PROMPT}) + "\n")
    command = aiperf_command(aiperf, front.root, model_id, tokenizer, prompts, concurrency, requests, artifacts)
    cpu_before = children_cpu_s()
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=120 + 90 * requests, cwd=out)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError(f"aiperf timed out after {exc.timeout:.0f} s") from None
    cpu_s = children_cpu_s() - cpu_before
    (out / f"aiperf_c{concurrency}.log").write_text(process.stdout + process.stderr)
    export = artifacts / "profile_export_aiperf.json"
    if process.returncode != 0 or not export.exists():
        output = (process.stdout + process.stderr).splitlines()
        errors = [line for line in output if "Reason:" in line or "Error" in line]
        raise RuntimeError(f"aiperf status {process.returncode}: "
                           f"{errors[-1].strip(' │') if errors else last_line(process.stderr or process.stdout)}")
    result = parse_aiperf(export)
    return LoadRow(AIPERF, FRONT_PATH, concurrency, result["requests"], result["throughput"], result["p50_ms"],
                   result["p99_ms"], result["errors"], cpu_s), result["version"]


def run_threads(tool: str, path: str, send_factory, concurrency: int, requests: int) -> LoadRow:
    """The load with Python clients: `concurrency` threads, each with its own client (send_factory()),
    sending `requests` requests in all after one warm-up request per thread. AIPerf's fallback through
    the front, and the same-client control on both paths."""
    senders = [send_factory() for _ in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda send: send(), senders))  # warm-up
    latencies, errors, lock, remaining = [], [0], threading.Lock(), [requests]

    def worker(send):
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            start = time.perf_counter()
            try:
                send()
            except Exception:  # a failed request is counted, the load goes on
                with lock:
                    errors[0] += 1
                continue
            with lock:
                latencies.append(time.perf_counter() - start)

    start, cpu_before = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(worker, senders))
    elapsed = time.perf_counter() - start
    return LoadRow(tool, path, concurrency, len(latencies), len(latencies) / elapsed, 1e3 * percentile(latencies, 50),
                   1e3 * percentile(latencies, 99), errors[0], time.process_time() - cpu_before)


def stage_seconds(server, stage: str) -> float:
    return metric_by_label(server.metrics, "flux2_bls_stage_seconds_total", "stage").get(stage, 0.0)


def run_perf_analyzer(server, concurrency: int, requests: int, out: Path) -> tuple[LoadRow, list[str], bool]:
    """perf_analyzer on flux2_klein_kv over gRPC at one concurrency with --request-count (perf_analyzer
    takes one concurrency per run with it): (its row, its command line, whether the BLS encoded PNGs
    for it). RuntimeError (one line) when it fails."""
    perf_analyzer = provision_perf_analyzer(log=lambda message: log(f"  {message}"))
    folder = out / f"perf_c{concurrency}"
    folder.mkdir(parents=True, exist_ok=True)
    data = input_data.write(CASE, folder / f"{CASE}.json", height=SIDE, width=SIDE, num_inference_steps=STEPS,
                            seed=SEED)
    args = perf_run.parse_args(["--concurrency", f"{concurrency}:{concurrency}",
                                 f"--pa-arg=--request-count={requests}", "--timeout", str(120 + 90 * requests)])
    png_before, cpu_before = stage_seconds(server, "png"), children_cpu_s()
    result = perf_run.run_case(perf_analyzer, CASE, "grpc", server.grpc, data, folder, args, server.admin_key)
    png_encoded, cpu_s = stage_seconds(server, "png") > png_before, children_cpu_s() - cpu_before
    if result.error:
        raise RuntimeError(result.error)
    row = result.rows[0]
    command = perf_run.command(perf_analyzer, server.grpc, "grpc", data, f"{CASE}_grpc.csv", args)
    return (LoadRow(PERF_ANALYZER, DIRECT_PATH, concurrency, row.requests or requests, row.throughput, row.p50_ms,
                    row.p99_ms, tool_cpu_s=cpu_s), command, png_encoded)


# ---------------------------------------------------------------- markdown

TOOL_ORDER = (AIPERF, THREADS_FRONT, THREADS_DIRECT, PERF_ANALYZER)


def load_table(rows: list[LoadRow]) -> str:
    """Markdown: one row per run, then the front / direct ratios (RATIOS) per concurrency."""
    lines = ["| tool | path | concurrency | requests | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | "
             "load tool CPU (s) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    order = {tool: index for index, tool in enumerate(TOOL_ORDER)}
    for row in sorted(rows, key=lambda r: (r.concurrency, order.get(r.tool, len(order)))):
        errors = f" ({row.errors} failed)" if row.errors else ""
        cpu = "" if row.tool_cpu_s is None else f"{row.tool_cpu_s:.1f}"
        lines.append(f"| {row.tool} | {row.path} | {row.concurrency} | {row.requests}{errors} | {row.throughput:.3f} | "
                     f"{row.p50_ms:.0f} | {row.p99_ms:.0f} | {cpu} |")
    for concurrency in sorted({row.concurrency for row in rows}):
        for label, front_tool, direct_tool in RATIOS:
            front = next((r for r in rows if (r.concurrency, r.tool) == (concurrency, front_tool)), None)
            direct = next((r for r in rows if (r.concurrency, r.tool) == (concurrency, direct_tool)), None)
            if front and direct and direct.throughput and direct.p50_ms and direct.p99_ms:
                lines.append(f"| front / direct: {label} | | {concurrency} | | "
                             f"{front.throughput / direct.throughput:.2f}x | {front.p50_ms / direct.p50_ms:.2f}x | "
                             f"{front.p99_ms / direct.p99_ms:.2f}x | |")
    return "\n".join(lines)


def overhead_table(summary: dict) -> str:
    direct_n, front_n = summary["requests"]
    return "\n".join([
        "| path | requests | median e2e (ms) | p90 e2e (ms) |",
        "|---|---:|---:|---:|",
        f"| {DIRECT_PATH}, `Flux2Client` | {direct_n} | {summary['direct_p50']:.0f} | {summary['direct_p90']:.0f} |",
        f"| {FRONT_PATH}, official `openai` client | {front_n} | {summary['front_p50']:.0f} | "
        f"{summary['front_p90']:.0f} |",
        f"| front - direct | | **{summary['overhead_p50']:+.0f}** ({summary['ratio_p50']:.3f}x) | "
        f"{summary['overhead_p90']:+.0f} |",
    ])


def quoted(command: list[str]) -> str:
    """A command line as the section shows it: the repository's paths relative, this run's ports as PORT."""
    text = " ".join(f"'{part}'" if " " in part or "{" in part else part for part in command)
    text = text.replace(str(Path(__file__).resolve().parents[1]) + "/", "")
    text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", text)
    return re.sub(r"/tmp/[^ ]*/", "OUT/", text)


def ratio_text(rows: list[LoadRow], front_tool: str, direct_tool: str) -> str:
    """'0.98x at concurrency 1, 1.01x at 2': front / direct throughput per concurrency."""
    parts = []
    for concurrency in sorted({row.concurrency for row in rows}):
        front = next((r for r in rows if (r.concurrency, r.tool) == (concurrency, front_tool)), None)
        direct = next((r for r in rows if (r.concurrency, r.tool) == (concurrency, direct_tool)), None)
        if front and direct and direct.throughput:
            parts.append(f"{front.throughput / direct.throughput:.2f}x at concurrency {concurrency}")
    return ", ".join(parts) or "not measured"


def markdown(args, summary: dict, rows: list[LoadRow], notes: list[str], seconds: float) -> str:
    lines = [
        "## OpenAI Images front: overhead and load (`make bench`: `python -m bench.front`)",
        "",
        f"Command: `{args.command}` ({seconds / 60:.1f} min). Machine: {machine()}. Tiny checkpoint, fp32, CPU, "
        "onnxruntime components, one BLS instance; the front (`python -m flux2_serving.front`, one uvicorn process) "
        "on the same machine, Triton's gRPC on loopback. Every request: the prompt "
        f"\"{PROMPT}\", {SIDE}x{SIDE}, {STEPS} steps, seed {SEED}, one PNG (through the front "
        "`response_format=b64_json`, `output_format=png`; direct, the outputs `png`, `seed`, `notes`: what the front "
        "asks Triton for).",
        "",
    ]
    if "own_ms" in summary:
        added = summary["own_ms"] + summary["outside_ms"]
        lines += [
            f"**Front overhead per request at {SIDE}x{SIDE}: {added:.0f} ms** (mean over the front's requests below: "
            f"the caller's e2e minus the front's own Triton call, from its /metrics): {summary['own_ms']:.1f} ms "
            "inside the front besides the Triton call (parsing, checks, base64 and JSON of the PNG) and "
            f"{summary['outside_ms']:.0f} ms of HTTP on loopback and the `openai` client (sending, receiving the "
            "~4 MiB JSON body, parsing it, decoding the base64). The front held each request "
            f"{summary['inside_ms']:.0f} ms, its Triton call {summary['triton_call_ms']:.0f} ms.",
            "",
        ]
    lines += [
        f"The same as an A/B of end-to-end latencies: {args.repeats} sequential requests alternating the two paths "
        "after one warm-up of each; e2e = from the call to the PNG's bytes in the caller's hand. Front minus direct "
        f"medians: {summary['overhead_p50']:+.0f} ms ({summary['ratio_p50']:.3f}x), while the direct requests alone "
        f"spread over {summary['direct_spread']:.0f} ms: on this machine that difference is mostly noise around the "
        "figure above.",
        "",
        overhead_table(summary),
        "",
        "The front's PNG is byte for byte the direct one (same seed)." if summary["same_png"] else
        "**The front's PNG differed from the direct one for the same seed.**",
        "",
        f"Load, the same workload at concurrency {args.concurrency}, {args.requests} requests per run (AIPerf and "
        "the threads after one warm-up request per concurrent client; perf_analyzer has no warm-up option, the server "
        "is warm from the runs before it). Throughput = requests / the run's wall time; with this few requests p99 is "
        "about the slowest request. Load tool CPU = CPU seconds the tool's own processes used during the run.",
        "",
        load_table(rows),
        "",
    ]
    reading = []
    aiperf = [r for r in rows if r.tool == AIPERF and r.tool_cpu_s is not None and r.throughput]
    if aiperf:
        cpu = sorted(r.tool_cpu_s for r in aiperf)
        wall = sorted(r.requests / r.throughput for r in aiperf)
        reading.append(f"Reading it: AIPerf through the front against perf_analyzer on Triton gives "
                       f"{ratio_text(rows, AIPERF, PERF_ANALYZER)} in throughput, but that compares two tools as well "
                       f"as two paths: AIPerf's own processes used {cpu[0]:.0f}-{cpu[-1]:.0f} CPU seconds per run (its "
                       f"start included) against runs of {wall[0]:.0f}-{wall[-1]:.0f} s on 2 cores the server needs, "
                       "where perf_analyzer (C++) and the Python threads use a fraction of a second.")
    if any(r.tool == THREADS_FRONT for r in rows):
        reading.append(f"The same Python client on both paths gives {ratio_text(rows, THREADS_FRONT, THREADS_DIRECT)}.")
    if reading and "own_ms" in summary and summary["direct_p50"]:
        added = summary["own_ms"] + summary["outside_ms"]
        reading.append(f"With {args.requests} requests per run, runs move by 10-20% from one to the next here, while "
                       f"the front adds {added:.0f} ms, {100 * added / summary['direct_p50']:.1f}% of a request: below "
                       "what these load runs resolve; the per-request figure at the top is the precise one.")
    if reading:
        lines += [" ".join(reading), ""]
    lines += [f"- {note}" for note in notes]
    lines += ["", "Caveat: 2 CPU cores shared by tritonserver, the front and the load tool; the tiny model's VAE "
              "decoder dominates each request. On a GPU server the front's per-request cost above is the figure to "
              "read: there a request takes a fraction of this machine's seconds, so the same milliseconds weigh more, "
              "and the load tool runs on cores the server does not need."]
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def load_runs(args, server, front, model_id: str, out: Path) -> tuple[list[LoadRow], list[str]]:
    """Every load run and notes on how they ran: through the front with AIPerf (or, where it cannot run, threads
    of openai clients), the same-client control (threads, both paths), and perf_analyzer on Triton."""
    rows, notes, aiperf, fallback, opened = [], [], None, None, []
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    if args.load_tool == "threads":
        fallback = "`--load-tool threads` was given"
    else:
        try:
            aiperf = aiperf_provision.provision(log=lambda message: log(f"  {message}"))
        except ToolError as exc:
            fallback = f"AIPerf could not be installed: {exc}"
    tokenizer = Path(args.checkpoint) / "tokenizer"
    tokenizer = str(tokenizer.resolve()) if tokenizer.is_dir() else "builtin"
    versions, aiperf_command_line, perf_command_line, png_for_perf = set(), None, None, True

    def direct_client_sender():
        opened.append(Flux2Client(server.grpc))
        return direct_sender(opened[-1])

    def report(row: LoadRow) -> None:
        rows.append(row)
        log(f"  {row.throughput:.3f} req/s, p50 {row.p50_ms:.0f} ms, p99 {row.p99_ms:.0f} ms"
            + (f", tool CPU {row.tool_cpu_s:.1f} s" if row.tool_cpu_s is not None else ""))

    for concurrency in concurrencies:
        if aiperf and not fallback:
            log(f"AIPerf through the front, concurrency {concurrency}, {args.requests} requests ...")
            try:
                row, version = run_aiperf(aiperf, front, model_id, tokenizer, concurrency, args.requests, out)
                report(row)
                versions.add(version)
                aiperf_command_line = aiperf_command(aiperf, front.root, model_id, tokenizer, out / "prompts.jsonl",
                                                     concurrency, args.requests, out / f"aiperf_c{concurrency}")
            except RuntimeError as exc:
                fallback = f"AIPerf failed at concurrency {concurrency}: {exc}"
                log(f"  {fallback}; threads of openai clients take its place")
        for tool, path, factory in ((THREADS_FRONT, FRONT_PATH, lambda: front_sender(openai_client(front), model_id)),
                                    (THREADS_DIRECT, DIRECT_PATH, direct_client_sender)):
            log(f"{tool} on the {path} path, concurrency {concurrency}, {args.requests} requests ...")
            report(run_threads(tool, path, factory, concurrency, args.requests))
        log(f"perf_analyzer on Triton, concurrency {concurrency}, {args.requests} requests ...")
        try:
            row, command, png_encoded = run_perf_analyzer(server, concurrency, args.requests, out)
            report(row)
            perf_command_line, png_for_perf = command, png_for_perf and png_encoded
        except (RuntimeError, ToolError) as exc:
            notes.append(f"perf_analyzer at concurrency {concurrency} failed: {exc}")
            log(f"  failed: {exc}")
    for client in opened:
        client.close()
    if aiperf_command_line:
        notes.append(f"AIPerf {', '.join(sorted(v for v in versions if v)) or aiperf_provision.VERSION} "
                     f"(PyPI `{aiperf_provision.PACKAGE}` in a venv of its own, `python -m bench.aiperf_provision`: "
                     "its pins clash with the project's), e.g. "
                     f"`{quoted(aiperf_command_line)}`; numbers from its profile_export_aiperf.json "
                     "(request_throughput, request_latency p50/p99). `--tokenizer` is the served checkpoint's own "
                     "tokenizer folder: AIPerf counts prompt tokens even for images, and by default it would fetch a "
                     "tokenizer from the Hugging Face Hub.")
    if fallback:
        notes.append(f"No AIPerf rows{' from then on' if aiperf_command_line else ''}: {fallback}. The threads of "
                     "`openai` clients through the front stand in for it.")
    notes.append("Python threads: one client per concurrent request (`openai.OpenAI(max_retries=0)` through the front, "
                 "`Flux2Client` over gRPC direct), one warm-up request each, the same requests as above.")
    if perf_command_line:
        version = perf_analyzer_version(Path(perf_command_line[0])) or "perf_analyzer"
        notes.append(f"{version} (`python -m perf.provision`), one run per concurrency (it takes `--request-count` "
                     f"with one concurrency only), e.g. `{quoted(perf_command_line)}`; input data "
                     f"`perf.input_data` {CASE} at {SIDE}x{SIDE}, {STEPS} steps, seed {SEED}.")
        if png_for_perf:
            notes.append("perf_analyzer names every output the model declares, so its responses carry the raw "
                         "pixels (`images`, 3 MiB at 1024^2) beside the PNG the front asks for: the direct rows "
                         "move a little more data than the front's Triton calls.")
    return rows, notes


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.front", __doc__, "checkpoints/tiny", "build/onnx/tiny-fp32",
                              "the exported model (tokenizer, scheduler); its tokenizer/ folder also serves AIPerf")
    parser.add_argument("--repeats", type=int, default=8,
                        help="overhead: timed sequential requests, alternating direct and front")
    parser.add_argument("--concurrency", default="1,2", help="load: comma-separated concurrencies")
    parser.add_argument("--requests", type=int, default=6, help="load: requests per run (each tool, each concurrency)")
    parser.add_argument("--load-tool", choices=("aiperf", "threads"), default="aiperf",
                        help="through the front: AIPerf (threads of openai clients stand in where it cannot run), "
                             "or the threads alone")
    parser.add_argument("--out", help="keep AIPerf's and perf_analyzer's files here (default: a temporary folder)")
    args = parse_benchmark_args(parser, argv)
    try:
        from flux2_serving.front.serve import running_front
    except ImportError as exc:
        print(f"error: the front is not importable ({exc}); it is flux2_serving/front", file=sys.stderr)
        return 2

    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="flux2-front-bench-")))
        out = Path(args.out).resolve() if args.out else workdir / "out"
        out.mkdir(parents=True, exist_ok=True)
        log(f"starting tritonserver on the tiny checkpoint ({args.onnx_dir}) ...")
        server = stack.enter_context(tiny_server(args.onnx_dir, args.checkpoint, workdir))
        front = stack.enter_context(running_front(server.grpc))
        client = openai_client(front)
        model_id = client.models.list().data[0].id
        log(f"tritonserver gRPC {server.grpc} ({BLS_MODEL}), front {front.url} (model {model_id!r}) ready after "
            f"{time.perf_counter() - started:.0f} s")
        log(f"overhead: {args.repeats} requests at {SIDE}x{SIDE}, alternating direct and front ...")
        with Flux2Client(server.grpc) as direct_client:
            measured = measure_overhead(direct_sender(direct_client), front_sender(client, model_id), front,
                                        args.repeats)
        summary = overhead_summary(measured)
        log(f"front {summary['front_p50']:.0f} ms, direct {summary['direct_p50']:.0f} ms (medians): overhead "
            f"{summary['overhead_p50']:+.0f} ms ({summary['ratio_p50']:.3f}x)"
            + (f"; inside the front {summary['own_ms']:.1f} ms besides the Triton call" if "own_ms" in summary else ""))
        rows, load_notes = load_runs(args, server, front, model_id, out)
    text = markdown(args, summary, rows, load_notes, time.perf_counter() - started)
    publish("front", text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
