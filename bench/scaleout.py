"""python -m bench.scaleout: two Triton replicas behind nginx, routing by reference vs round robin.

One repository of the tiny checkpoint (onnxruntime, CPU), served by N tritonserver processes on
loopback, each with its own reference K/V cache; nginx (flux2_serving.server.gateway, the shipped configuration
deploy/nginx/flux2-gateway.conf) in front. The same kind of workload goes through two gateways on
the same replicas: repeated edits of a few references mixed with text-to-image, alternating gRPC
and HTTP, sequential. With affinity (the x-flux2-reference-key header hashed to one replica) a
reference misses once; with round robin it misses on every replica it lands on. Each policy gets
references of its own, so neither finds the other's entries. Then a replica is killed (-9) under
load and started again: requests fail over to the other replica, errors are limited to requests in
flight at the kill, and the restarted replica takes its share again. tests/test_scaleout.py runs
the same functions on a small workload; `make bench` writes the figures to BENCHMARKS.md.
"""

from __future__ import annotations

import contextlib
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import tritonclient.grpc as grpc

from bench.report import benchmark_parser, machine, parse_benchmark_args, publish
from flux2_serving.clients.api import UNAVAILABLE_HINT, Flux2Client, Flux2Error
from flux2_serving.contract.names import BLS_MODEL
from flux2_serving.devtools.metrics import reference_cache_metrics
from flux2_serving.devtools.pictures import synthetic_reference
from flux2_serving.server.gateway import Replica, running_gateway
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble


@dataclass
class Request:
    kind: str  # "edit" or "text_to_image"
    protocol: str  # "grpc" or "http"
    prompt: str
    references: list = field(default_factory=list)  # encoded bytes


@dataclass
class Result:
    request: Request
    seconds: float
    error: str | None = None


def workload(references: list[bytes], repeats: int, text_to_image_every: int = 3,
             shuffle_seed: int | None = None) -> list[Request]:
    """Each reference edited `repeats` times, round after round (in a seeded random order within a
    round if `shuffle_seed` is given, as independent callers would arrive), a text-to-image request
    after every `text_to_image_every` edits; gRPC for even rounds, HTTP for odd ones."""
    rng = random.Random(shuffle_seed)
    requests, edits = [], 0
    for round_ in range(repeats):
        protocol = ("grpc", "http")[round_ % 2]
        order = list(range(len(references)))
        if shuffle_seed is not None:
            rng.shuffle(order)
        for index in order:
            requests.append(Request("edit", protocol, f"edit {index}, take {round_}", [references[index]]))
            edits += 1
            if edits % text_to_image_every == 0:
                requests.append(Request("text_to_image", protocol, f"text to image {len(requests)}"))
    return requests


def send(gateway, request: Request, side: int, steps: int, timeout_s: float = 300) -> Result:
    url = gateway.grpc if request.protocol == "grpc" else gateway.http
    start = time.perf_counter()
    try:
        with Flux2Client(url, request.protocol, timeout_s=timeout_s) as client:
            client.generate(request.prompt, request.references, height=side, width=side, seed=1,
                            num_inference_steps=steps)
        return Result(request, time.perf_counter() - start)
    except Flux2Error as exc:
        return Result(request, time.perf_counter() - start, str(exc))


def cache_counts(replicas) -> dict[str, float]:
    """Reference cache hits and misses summed over the replicas (their metrics endpoints)."""
    totals = {"hits_total": 0.0, "misses_total": 0.0}
    for replica in replicas:
        metrics = reference_cache_metrics(replica.metrics)
        for key in totals:
            totals[key] += metrics.get(key, 0.0)
    return totals


def inference_count(replica, model: str = BLS_MODEL) -> int:
    client = grpc.InferenceServerClient(replica.grpc)
    stats = client.get_inference_statistics(model, headers=replica.admin_headers("grpc")).model_stats[0]
    return stats.inference_count


def run_policy(replicas, gateway, requests: list[Request], side: int, steps: int) -> dict:
    """Send `requests` sequentially through `gateway`; hit rate and edit latency from this run."""
    before = cache_counts(replicas)
    results = [send(gateway, request, side, steps) for request in requests]
    after = cache_counts(replicas)
    hits, misses = (after[k] - before[k] for k in ("hits_total", "misses_total"))
    edits = [r.seconds for r in results if r.request.kind == "edit" and r.error is None]
    return {"requests": len(results), "errors": [r.error for r in results if r.error],
            "edits": len(edits), "hits": int(hits), "misses": int(misses),
            "hit_rate": hits / max(hits + misses, 1), "edit_mean_s": statistics.mean(edits) if edits else float("nan"),
            "text_to_image_mean_s": statistics.mean([r.seconds for r in results if r.request.kind == "text_to_image"]
                                                    or [float("nan")])}


@contextlib.contextmanager
def replicas_of(onnx_dir, checkpoint, workdir: Path, count: int = 2, bls_instances: int = 1):
    """`count` tritonservers on one assembled repository (tiny, onnxruntime), free loopback ports."""
    repository = assemble(onnx_dir, checkpoint, workdir / "model_repository", backend="onnxruntime",
                          bls_instances=bls_instances)
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(running(repository, log_file=workdir / f"replica{i}.log")) for i in range(count)]


def gateway_replicas(replicas):
    return [Replica(r.http, r.grpc) for r in replicas]


def kill_and_restart(replicas, gateway, references: list[bytes], side: int, steps: int,
                     victim: int = 1, before_kill: int = 4, concurrency: int = 2, log=print) -> dict:
    """Load through `gateway` from `concurrency` threads; kill -9 replica `victim`'s tritonserver after
    `before_kill` requests, keep the load on, start it again on the same ports, and keep going
    until it has served requests again. Returns what the clients saw, and when."""
    replica = replicas[victim]
    stop, lock = threading.Event(), threading.Lock()
    results: list[tuple[float, Result]] = []
    started = time.monotonic()

    def client(worker: int) -> None:
        index = worker
        while not stop.is_set():
            reference = references[index % len(references)]
            request = Request("edit", ("grpc", "http")[index % 2], f"failover {index}", [reference])
            result = send(gateway, request, side, steps)
            with lock:
                results.append((time.monotonic() - started, result))
            index += concurrency

    threads = [threading.Thread(target=client, args=(w,), daemon=True) for w in range(concurrency)]
    for thread in threads:
        thread.start()
    while len(results) < before_kill:
        time.sleep(0.05)
    killed_at = time.monotonic() - started
    for process in (replica.gate, replica.process):  # the whole replica (its gate and tritonserver), -9: no goodbye
        if process is not None:
            process.kill()
            process.wait()
    log(f"killed replica {victim} at {killed_at:.1f} s")
    time.sleep(2)
    replica.restart()  # same ports: the gateway's configuration still names them
    if replica.gate is not None:
        replica.restart_gate()
    restarted_at = time.monotonic() - started
    log(f"replica {victim} ready again at {restarted_at:.1f} s")
    served_again_at = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if inference_count(replica) > 0:
            served_again_at = time.monotonic() - started
            break
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join(300)
    errors = [(t, r.error) for t, r in results if r.error]
    return {"requests": len(results), "killed_at": killed_at, "restarted_at": restarted_at,
            "served_again_at": served_again_at, "errors": errors, "concurrency": concurrency,
            "after_restart_ok": sum(1 for t, r in results if t > restarted_at and r.error is None)}


def markdown(args, rows: dict, failover: dict, seconds: float) -> str:
    lines = [
        "## Scale-out: 2 replicas behind nginx, routing by reference vs round robin "
        "(`make bench`: `python -m bench.scaleout`)",
        "",
        f"Command: `{args.command}` ({seconds / 60:.1f} min). Machine: {machine()}. Tiny checkpoint, fp32, CPU, 2 "
        f"tritonserver replicas (one BLS instance each, a reference K/V cache each) on loopback, nginx "
        f"(deploy/nginx/flux2-gateway.conf) in front; {args.references} references of {args.side}x{args.side} "
        f"edited {args.repeats} times each, round after round in a seeded random order (seed {args.seed}), a "
        f"text-to-image request after every 3 edits, gRPC and HTTP in alternate rounds, sequential, "
        f"{args.side}x{args.side} output, {args.steps} steps. Each policy gets references of its own.",
        "",
        "| routing | requests | cache hit rate | hits / misses | mean edit latency (s) | mean text-to-image (s) | "
        "errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, row in rows.items():
        lines.append(f"| {policy} | {row['requests']} | {row['hit_rate']:.2f} | {row['hits']} / {row['misses']} | "
                     f"{row['edit_mean_s']:.2f} | {row['text_to_image_mean_s']:.2f} | {len(row['errors'])} |")
    affinity, round_robin = rows["affinity"], rows["round-robin"]
    lines += ["", f"Edits through round robin took {round_robin['edit_mean_s'] / affinity['edit_mean_s']:.2f}x as long "
              "on average as through affinity routing: the difference is the misses (a miss adds VAE encoding and "
              "the prefill). With N replicas round robin's misses grow toward N per reference."]
    errors = failover["errors"]
    lines += ["", f"Failover: {failover['concurrency']} clients editing through the affinity gateway; replica 1 "
              f"killed (-9) at {failover['killed_at']:.1f} s, started again (ready) at "
              f"{failover['restarted_at']:.1f} s, served requests again from {failover['served_again_at']:.1f} s. "
              f"{failover['requests']} requests, {len(errors)} failed"
              + (": " + "; ".join(f"at {t:.1f} s: `{e.replace(UNAVAILABLE_HINT, '')[:120]}`" for t, e in errors[:4])
                 + " (the client adds that the replica went away in flight and the request can be sent again)"
                 if errors else "")
              + f"; {failover['after_restart_ok']} succeeded after the restart."]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.scaleout", __doc__, "checkpoints/tiny", "build/onnx/tiny-fp32",
                              "the exported model (tokenizer, scheduler)")
    parser.add_argument("--references", type=int, default=4, help="distinct references per policy")
    parser.add_argument("--repeats", type=int, default=4, help="edits of each reference")
    parser.add_argument("--side", type=int, default=512, help="reference and output side in pixels")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival order within a round")
    args = parse_benchmark_args(parser, argv)
    started, rows = time.perf_counter(), {}
    with tempfile.TemporaryDirectory(prefix="flux2-scaleout-") as tmp, \
            replicas_of(args.onnx_dir, args.checkpoint, Path(tmp)) as replicas:
        for offset, policy in enumerate(("round-robin", "affinity")):
            references = [synthetic_reference((args.side, args.side), 17 * i + 100 * offset)
                          for i in range(args.references)]
            with running_gateway(gateway_replicas(replicas), Path(tmp) / policy, policy) as gateway:
                requests = workload(references, args.repeats, shuffle_seed=args.seed)
                rows[policy] = run_policy(replicas, gateway, requests, args.side, args.steps)
            print(f"[scaleout] {policy}: {rows[policy]}", flush=True)
        with running_gateway(gateway_replicas(replicas), Path(tmp) / "failover") as gateway:
            references = [synthetic_reference((args.side, args.side), 7 * i + 300) for i in range(args.references)]
            failover = kill_and_restart(replicas, gateway, references, args.side, args.steps,
                                        log=lambda m: print(f"[scaleout] {m}", flush=True))
    text = markdown(args, rows, failover, time.perf_counter() - started)
    publish('scaleout', text, write=not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
