"""python -m perf.run: perf_analyzer load tests of `flux2_klein_kv` over gRPC and HTTP -> a markdown table.

For every case (text-to-image, 1 reference, 3 references) and protocol, perf_analyzer sweeps the
concurrency range with `--bls-composing-models` so the server-side statistics of the models the
BLS calls are reported too. Each run leaves CASE_PROTOCOL.csv (+ one MODEL_vN.CASE_PROTOCOL.csv per
composing model) and CASE_PROTOCOL.log in OUT; the table goes to OUT/results.md and stdout.

    python -m perf.provision
    python -m perf.run --repository build/model_repository --out build/perf
    python -m perf.run --grpc-url 127.0.0.1:8001 --http-url 127.0.0.1:8000   # an already-running server
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.names import BLS_MODEL as MODEL
from flux2_serving.contract.security import admin_headers, configured_admin_key
from flux2_serving.server.launch import running
from perf import input_data
from perf.provision import DEFAULT_DIR as PROVISION_DIR
from perf.provision import version as perf_analyzer_version

# Versions are explicit: perf_analyzer 2.48 fails with "failed to find the requested model version"
# when a composing model is named without one. The repository assembles version 1 of each.
COMPOSING_MODELS = COMPONENTS
PROTOCOLS = ("grpc", "http")


@dataclass
class Composing:
    calls_per_request: float
    queue_ms: float
    compute_ms: float  # compute input + infer + output, mean per call


@dataclass
class Row:
    concurrency: int
    throughput: float  # infer/s
    p50_ms: float
    p99_ms: float
    requests: int | None = None  # client request count of the reported (stable) window
    composing: dict[str, Composing] = field(default_factory=dict)


@dataclass
class Result:
    case: str
    protocol: str
    rows: list[Row] = field(default_factory=list)
    error: str | None = None
    seconds: float = 0.0
    command: str = ""  # perf_analyzer's command line as run (in OUT), the admin key masked


def _versioned(models) -> list[str]:
    return [m if ":" in m else f"{m}:1" for m in models]


def command(perf_analyzer, url: str, protocol: str, data: Path, csv_name: str, args,
            admin_key: str | None = None) -> list[str]:
    """perf_analyzer's command line. The composing models' server-side numbers come from Triton's
    statistics, open on this project's servers; `admin_key`, if given, goes with every request as a
    header (-H) for a server that restricts them."""
    headers = [arg for name, value in admin_headers(admin_key, protocol).items() for arg in ("-H", f"{name}:{value}")]
    cmd = [str(perf_analyzer), "-m", MODEL, "-u", url, "-i", protocol, "--input-data", str(data), *headers,
           f"--bls-composing-models={','.join(_versioned(args.composing_models))}",
           "--concurrency-range", args.concurrency, "--measurement-mode", args.measurement_mode,
           "--measurement-interval", str(args.measurement_interval),
           "--measurement-request-count", str(args.measurement_request_count),
           "--stability-percentage", str(args.stability_percentage), "--max-trials", str(args.max_trials),
           "-f", csv_name, "--verbose-csv"]
    return cmd + list(args.pa_arg or [])


def _float(row: dict, key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else 0.0


def _read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return [row for row in csv.DictReader(handle) if row.get("Concurrency")]


def request_counts(log: str) -> dict[int, int]:
    """{concurrency: client request count} from perf_analyzer's stdout."""
    counts = {}
    for match in re.finditer(r"Request concurrency: (\d+)\s+Client:\s+Request count: (\d+)", log):
        counts[int(match.group(1))] = int(match.group(2))
    return counts


def parse(csv_path: Path, composing_models=COMPOSING_MODELS, log: str = "") -> list[Row]:
    """Rows of a `-f` CSV (and its composing-model CSVs beside it), sorted by concurrency."""
    csv_path = Path(csv_path)
    counts = request_counts(log)
    rows = {}
    for record in _read_csv(csv_path):
        concurrency = int(float(record["Concurrency"]))
        rows[concurrency] = Row(concurrency, throughput=_float(record, "Inferences/Second"),
                                p50_ms=_float(record, "p50 latency") / 1000,
                                p99_ms=_float(record, "p99 latency") / 1000, requests=counts.get(concurrency))
    for model in composing_models:
        name, _, version = model.partition(":")
        path = csv_path.with_name(f"{name}_v{version or '1'}.{csv_path.name}")
        if not path.exists():
            continue
        for record in _read_csv(path):
            row = rows.get(int(float(record["Concurrency"])))
            if row is None:
                continue
            compute = sum(_float(record, f"Server Compute {part}") for part in ("Input", "Infer", "Output"))
            calls = _float(record, "Inferences/Second") / row.throughput if row.throughput else 0.0
            row.composing[name] = Composing(calls, _float(record, "Server Queue") / 1000, compute / 1000)
    return [rows[c] for c in sorted(rows)]


def _masked(cmd: list[str], admin_key: str | None) -> list[str]:
    return [arg.replace(admin_key, "***") if admin_key else arg for arg in cmd]


def _what_to_do(message: str, url: str, protocol: str) -> str:
    """One hint for the failures a user meets first ('' for any other)."""
    text = message.lower()
    if "restricted" in text:
        return (" -> this server restricts an API perf_analyzer uses: pass its admin key ($FLUX2_ADMIN_KEY), "
                "or serve with this project's launcher (statistics are open there)")
    if any(word in text for word in ("connect", "unavailable", "refused")):
        return (f" -> nothing serves {protocol} at {url}: start the server (make serve) or give the right "
                f"--{protocol}-url")
    return ""


def run_case(perf_analyzer, case: str, protocol: str, url: str, data: Path, out: Path, args,
             admin_key: str | None = None) -> Result:
    name = f"{case}_{protocol}"
    csv_name = f"{name}.csv"
    for stale in list(out.glob(f"{csv_name}")) + list(out.glob(f"*_v*.{csv_name}")):
        stale.unlink()
    result = Result(case, protocol)
    start = time.perf_counter()
    # perf_analyzer writes the composing-model CSVs as MODEL_vN.<-f value> relative to its working
    # directory, so it runs inside OUT with a bare file name.
    cmd = command(perf_analyzer, url, protocol, data.resolve(), csv_name, args, admin_key)
    result.command = shlex.join(_masked(cmd, admin_key))
    print(f"  command: {result.command}", flush=True)
    try:
        process = subprocess.run(cmd, cwd=out, capture_output=True, text=True, timeout=args.timeout)
        log = process.stdout + process.stderr
        status = process.returncode
    except subprocess.TimeoutExpired as exc:
        log = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        status = None
    result.seconds = time.perf_counter() - start
    (out / f"{name}.log").write_text(log)
    if status is None:
        result.error = f"perf_analyzer timed out after {args.timeout:.0f} s (see {out / (name + '.log')})"
    elif status != 0 or not (out / csv_name).exists():
        lines = [line for line in log.splitlines() if line.strip() and not line.startswith("Server average")]
        last = lines[-1].strip() if lines else "no output"
        result.error = f"perf_analyzer status {status}: {last}{_what_to_do(last, url, protocol)}"
    else:
        result.rows = parse(out / csv_name, args.composing_models, log)
        if not result.rows:
            result.error = f"{csv_name} holds no measurement"
    return result


def _cell(composing: Composing | None) -> str:
    if composing is None or composing.calls_per_request == 0:
        return "-"
    return f"{composing.calls_per_request:.1f} x {composing.queue_ms + composing.compute_ms:.1f}"


def table(results: list[Result], composing_models=COMPOSING_MODELS, header: str = "") -> str:
    names = [m.partition(":")[0] for m in composing_models]
    lines = [header] if header else []
    lines += ["| case | protocol | concurrency | requests | throughput (infer/s) | p50 latency (ms) | "
              "p99 latency (ms) | " + " | ".join(names) + " |",
              "|---|---|---:|---:|---:|---:|---:|" + "---:|" * len(names)]
    for result in results:
        if result.error:
            lines.append(f"| {result.case} | {result.protocol} | failed: {result.error} |")
            continue
        for row in result.rows:
            requests = "" if row.requests is None else str(row.requests)
            lines.append(f"| {result.case} | {result.protocol} | {row.concurrency} | {requests} | "
                         f"{row.throughput:.2f} | {row.p50_ms:.0f} | {row.p99_ms:.0f} | "
                         + " | ".join(_cell(row.composing.get(n)) for n in names) + " |")
    lines += ["", "Composing-model cells: calls per request x mean (queue + compute) ms per call, from Triton's "
              "statistics over the reported window (approximate: requests in flight at the window's edges); "
              "'-' where the model was not called. Requests: client request count of the reported (stable) window."]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    """The options of python -m perf.run (bench.front builds its perf_analyzer runs from them too)."""
    parser = argparse.ArgumentParser(prog="python -m perf.run", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--repository", default="build/model_repository",
                        help="model repository to start tritonserver on (ignored with --grpc-url/--http-url)")
    parser.add_argument("--grpc-url", help="use an already-running server's gRPC endpoint host:port")
    parser.add_argument("--http-url", help="use an already-running server's HTTP endpoint host:port")
    parser.add_argument("--out", default="build/perf", help="directory for inputs, CSVs, logs and results.md")
    parser.add_argument("--cases", default=",".join(input_data.CASES),
                        help=f"comma-separated subset of {','.join(input_data.CASES)}")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help="comma-separated subset of grpc,http")
    parser.add_argument("--concurrency", default="1:4", help="perf_analyzer --concurrency-range start:end[:step]")
    parser.add_argument("--perf-analyzer", default=str(PROVISION_DIR / "perf_analyzer"),
                        help="perf_analyzer executable (python -m perf.provision writes the default)")
    parser.add_argument("--composing-models", default=",".join(COMPOSING_MODELS),
                        type=lambda text: tuple(m for m in text.split(",") if m),
                        help="BLS composing models (name[:version], version 1 when left out)")
    parser.add_argument("--measurement-mode", choices=["count_windows", "time_windows"], default="count_windows")
    parser.add_argument("--measurement-interval", type=int, default=5000, help="time window, ms (time_windows)")
    parser.add_argument("--measurement-request-count", type=int, default=4,
                        help="minimum requests per window (count_windows)")
    parser.add_argument("--stability-percentage", type=float, default=50,
                        help="allowed max/min spread of the last 3 windows, %%")
    parser.add_argument("--max-trials", type=int, default=10, help="windows per concurrency before giving up")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per perf_analyzer run")
    parser.add_argument("--pa-arg", action="append", metavar="ARG",
                        help="extra perf_analyzer argument, repeatable (e.g. --pa-arg=--percentile=95)")
    parser.add_argument("--height", type=int, default=256, help="output height, px")
    parser.add_argument("--width", type=int, default=256, help="output width, px")
    parser.add_argument("--ref-size", type=int, default=256, help="side of the square references, px")
    parser.add_argument("--num-inference-steps", type=int, default=4, help="denoising steps per request")
    parser.add_argument("--no-reference-cache", action="store_true",
                        help="send reuse_reference_cache=false: every request encodes its references and runs the "
                             "prefill (by default the repeated request reuses the cached reference K/V)")
    return parser.parse_args(argv)


def run(argv=None) -> tuple[int, str]:
    """The load test as a function: (exit status, the results table); also writes OUT/results.md."""
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cases = [c for c in args.cases.split(",") if c]
    protocols = [p for p in args.protocols.split(",") if p]
    for case in cases:
        if case not in input_data.CASES:
            print(f"error: unknown case {case!r}; choose from {', '.join(input_data.CASES)}", file=sys.stderr)
            return 2, ""
    for protocol in protocols:
        if protocol not in PROTOCOLS:
            print(f"error: unknown protocol {protocol!r}; choose from grpc, http", file=sys.stderr)
            return 2, ""
    perf_analyzer = Path(args.perf_analyzer)
    if not perf_analyzer.exists():
        print(f"error: no perf_analyzer at {perf_analyzer}: run `python -m perf.provision` first", file=sys.stderr)
        return 2, ""

    data = input_data.write_all(out / "inputs", cases, height=args.height, width=args.width,
                                ref_size=args.ref_size, num_inference_steps=args.num_inference_steps,
                                reuse_reference_cache=not args.no_reference_cache)
    external = args.grpc_url or args.http_url
    server = contextlib.ExitStack()  # holds the tritonserver we start, if any
    if external:
        urls = {"grpc": args.grpc_url, "http": args.http_url}
        admin_key = configured_admin_key()  # $FLUX2_ADMIN_KEY: the composing models' statistics
        missing = [p for p in protocols if not urls[p]]
        if missing:
            print(f"error: no --{missing[0]}-url given for protocol {missing[0]} (or drop it from --protocols)",
                  file=sys.stderr)
            return 2, ""
    else:
        print(f"starting tritonserver on {args.repository} (log: {out / 'server.log'}) ...", flush=True)
        started = time.perf_counter()
        try:
            running_server = server.enter_context(running(args.repository, log_file=out / "server.log"))
        except Exception as exc:  # any failure to start: one line for the user
            print(f"error: tritonserver did not start: {exc} (see {out / 'server.log'})", file=sys.stderr)
            return 1, ""
        print(f"tritonserver ready in {time.perf_counter() - started:.0f} s", flush=True)
        urls = {p: getattr(running_server, p) for p in PROTOCOLS}
        admin_key = None  # statistics are open on the launcher's servers: the command lines need no key

    results = []
    try:
        for case in cases:
            for protocol in protocols:
                print(f"perf_analyzer: {case} over {protocol}, concurrency {args.concurrency} ...", flush=True)
                result = run_case(perf_analyzer, case, protocol, urls[protocol], data[case], out, args, admin_key)
                results.append(result)
                if result.error:
                    print(f"  failed after {result.seconds:.0f} s: {result.error}", flush=True)
                else:
                    summary = ", ".join(f"c={r.concurrency}: {r.throughput:.2f} infer/s p50 {r.p50_ms:.0f} ms"
                                        for r in result.rows)
                    print(f"  done in {result.seconds:.0f} s: {summary}", flush=True)
    finally:
        if not external:
            server.close()
            print("tritonserver stopped", flush=True)

    tool = perf_analyzer_version(perf_analyzer) or "perf_analyzer"
    header = (f"# perf_analyzer: {MODEL}\n\n{tool} on {os.cpu_count()} CPUs; {args.height}x{args.width} output, "
              f"{args.num_inference_steps} steps, references {args.ref_size}x{args.ref_size} PNG; "
              f"concurrency {args.concurrency}; {args.measurement_mode} "
              f"(request count {args.measurement_request_count}, interval {args.measurement_interval} ms, "
              f"stability {args.stability_percentage:g}%).\n")
    report = table(results, args.composing_models, header)
    report += "\nperf_analyzer's command lines (run in OUT, where the input files and CSVs are):\n\n"
    report += "".join(f"- {r.case} over {r.protocol}: `{r.command}`\n" for r in results)
    (out / "results.md").write_text(report)
    print(report, end="")
    print(f"wrote {out / 'results.md'}")
    return (1 if any(r.error for r in results) else 0), report


def main(argv=None) -> int:
    return run(argv)[0]


if __name__ == "__main__":
    raise SystemExit(main())
