"""python -m bench.overload: more clients than the server can serve, for a fixed time, with the BLS's
queue bounded (the shipped policy) and, as the baseline in the same run, practically unbounded.

Each of --clients threads sends requests back to back over gRPC for --seconds (text-to-image at
--side, --steps steps, its own seed); a client refused as overloaded waits --backoff seconds and
sends the next one. Per configuration: requests served, the admitted requests' latency (p50, p99),
the share refused, how fast a refusal came back, and the server's resident memory (tritonserver
and its Python-backend processes) before and after. Numbers, no pass/fail (tests/test_overload.py
checks the behaviour).

    python -m bench.overload                # the tiny model, 16 clients, 60 s per configuration
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import replace
from pathlib import Path

from bench.report import benchmark_parser, machine, parse_benchmark_args, publish, tree_memory_gib
from flux2_serving.clients.api import Flux2Client, Flux2Error
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble

# (label, BLS queue, queue timeout in s; None: the shipped value)
CONFIGS = (("bounded (shipped)", None, None), ("unbounded (baseline)", 100_000, 100_000))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def drive(server, clients: int, seconds: float, side: int, steps: int, backoff: float) -> dict:
    """`clients` threads for `seconds`; every request's (outcome, seconds)."""
    results: list[tuple[str, float]] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(index: int) -> None:
        with Flux2Client(server.grpc, timeout_s=600) as user:
            sent = 0
            while time.monotonic() < stop_at:
                started = time.monotonic()
                try:
                    user.generate(f"overload {index}.{sent}", height=side, width=side, seed=index * 1000 + sent,
                                  num_inference_steps=steps)
                    outcome = "served"
                except Flux2Error as exc:
                    outcome = "refused" if "overloaded" in str(exc) else f"error: {str(exc)[:80]}"
                with lock:
                    results.append((outcome, time.monotonic() - started))
                sent += 1
                if outcome != "served":
                    time.sleep(backoff)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"results": results, "wall_s": time.monotonic() - (stop_at - seconds)}


def run(args) -> list[dict]:
    workdir = Path("build/bench/overload")
    rows = []
    for label, queue, timeout in CONFIGS:
        queue = queue or args.queue or DEFAULT_ENVELOPE.bls_max_queue
        timeout = timeout or DEFAULT_ENVELOPE.bls_queue_timeout_s
        envelope = replace(DEFAULT_ENVELOPE, bls_max_queue=queue, bls_queue_timeout_s=timeout)
        repository = assemble(args.onnx_dir, args.checkpoint, workdir / "model_repository", backend="onnxruntime",
                              bls_instances=args.bls_instances, envelope=envelope)
        print(f"[overload] {label}: queue {queue}, {args.clients} clients for {args.seconds:.0f} s ...", flush=True)
        with running(repository, log_file=workdir / "server.log") as server:
            with Flux2Client(server.grpc) as warm:  # first-request costs out of the measurement
                warm.generate("warm-up", height=args.side, width=args.side, seed=0, num_inference_steps=args.steps)
            memory_before = tree_memory_gib(server.process.pid)["rss_gib"]
            driven = drive(server, args.clients, args.seconds, args.side, args.steps, args.backoff)
            memory_after = tree_memory_gib(server.process.pid)["rss_gib"]
        served = [s for outcome, s in driven["results"] if outcome == "served"]
        refused = [s for outcome, s in driven["results"] if outcome == "refused"]
        errors = [outcome for outcome, _ in driven["results"] if outcome.startswith("error")]
        total = len(driven["results"])
        rows.append({"config": label, "queue": queue, "requests": total, "served": len(served),
                     "throughput": len(served) / driven["wall_s"], "p50_s": percentile(served, 50),
                     "p99_s": percentile(served, 99), "refused_share": len(refused) / total if total else 0.0,
                     "refusal_ms": 1e3 * statistics.median(refused) if refused else float("nan"),
                     "errors": len(errors), "memory_before_gib": memory_before, "memory_after_gib": memory_after})
        print(f"[overload] {label}: {rows[-1]}", flush=True)
    return rows


def _number(value: float) -> str:
    return "-" if value != value else f"{value:.1f}"  # NaN: nothing was refused


def markdown(rows: list[dict], args) -> str:
    bounded, baseline = rows[0], rows[-1]
    lines = [
        "## Overload: a bounded queue",
        "",
        f"Machine: {machine()}. Command: `{args.command}`. Tiny model on the CPU (onnxruntime components), "
        f"{args.bls_instances} BLS instances; {args.clients} gRPC clients sending text-to-image "
        f"{args.side}x{args.side}, {args.steps} steps, back to back for {args.seconds:.0f} s per configuration; "
        f"a refused client waits {args.backoff:g} s before its next request. Same run, same machine: the baseline "
        f"is the same server with a queue of {baseline['queue']} (practically unbounded, the behaviour before "
        "issue 18).",
        "",
        "| configuration | BLS queue | requests | served | served/s | admitted p50 s | admitted p99 s | refused | "
        "median refusal ms | other errors | server memory before -> after GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(f"| {r['config']} | {r['queue']} | {r['requests']} | {r['served']} | {r['throughput']:.2f} | "
                     f"{r['p50_s']:.2f} | {r['p99_s']:.2f} | {100 * r['refused_share']:.0f}% | "
                     f"{_number(r['refusal_ms'])} | "
                     f"{r['errors']} | {r['memory_before_gib']:.2f} -> {r['memory_after_gib']:.2f} |")
    ratio = baseline["p99_s"] / bounded["p99_s"] if bounded["p99_s"] else float("nan")
    lines += ["", f"Admitted p99 with the bounded queue: {bounded['p99_s']:.2f} s against {baseline['p99_s']:.2f} s "
              f"unbounded ({ratio:.2f}x), at {bounded['throughput'] / baseline['throughput']:.2f}x the baseline's "
              "throughput (the refusals and the clients' retries share the machine with the server); "
              f"{100 * bounded['refused_share']:.0f}% of the requests sent were refused at once (UNAVAILABLE "
              "\"Exceeds maximum queue size\", median refusal time in the table) instead of waiting. These clients "
              "wait for each answer before the next request, so without a bound the queue holds at most one "
              f"request per client: the admitted latency grows with the number of callers ({args.clients} here), "
              "while the bound caps it near (queue + instances) requests' worth of work whatever the number of "
              "callers.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.overload", __doc__, "checkpoints/tiny", "build/onnx/tiny-fp32",
                              "model whose export --onnx-dir holds (the tiny one by default)")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=60, help="how long the clients send, per configuration")
    parser.add_argument("--side", type=int, default=512, help="output side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--bls-instances", type=int, default=2, help="BLS instances (the CPU default)")
    parser.add_argument("--queue", type=int, default=None,
                        help="the bounded configuration's queue (default: the envelope's bls_max_queue)")
    parser.add_argument("--backoff", type=float, default=0.5, help="seconds a refused client waits")
    args = parse_benchmark_args(parser, argv)
    rows = run(args)
    publish("overload", markdown(rows, args), write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
