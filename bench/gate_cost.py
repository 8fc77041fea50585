"""python -m bench.gate_cost: what the gate in front of the embedded tritonserver costs per request.

One server (flux2_serving.server.launch.running: tritonserver behind flux2_serving/server/gate.py); every
request is sent twice in alternation, once to the gate's public port and once straight to
tritonserver's loopback port behind it (the baseline, in the same run), over gRPC and HTTP:
a model-metadata call (nothing to check, nothing to carry), and text-to-image requests of 256^2 and
1024^2 (1 step, the `images` output: 0.2 and 3 MiB back through the gate). Median of --repeats per cell.
Numbers, no pass/fail (tests/test_gate.py checks the behaviour).

    python -m bench.gate_cost              # the tiny model's export in build/onnx/fp32
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import tritonclient.grpc as grpc
import tritonclient.http as http

from bench.report import benchmark_parser, machine, parse_benchmark_args, publish
from flux2_serving.clients.api import Flux2Client
from flux2_serving.contract.names import BLS_MODEL
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble

MODULES = {"grpc": grpc, "http": http}


def cases() -> list[tuple[str, object]]:
    """(label, call(Flux2Client, tritonclient client)) of each measured request."""
    found = [("model metadata", lambda client, raw: raw.get_model_metadata(BLS_MODEL))]
    for side in (256, 1024):
        found.append((f"text-to-image {side}^2, 1 step",
                      lambda client, raw, side=side: client.generate("a lighthouse at dusk", height=side,
                                                                     width=side, seed=1, num_inference_steps=1)))
    return found


def measure(server, repeats: int) -> list[dict]:
    rows = []
    addresses = {"grpc": {"gate": server.grpc, "direct": f"127.0.0.1:{server.upstream['grpc']}"},
                 "http": {"gate": server.http, "direct": f"127.0.0.1:{server.upstream['http']}"}}
    for protocol, urls in addresses.items():
        raw = {path: MODULES[protocol].InferenceServerClient(url) for path, url in urls.items()}
        clients = {path: Flux2Client(url, protocol=protocol, timeout_s=600) for path, url in urls.items()}
        for label, call in cases():
            seconds = {"gate": [], "direct": []}
            for _ in range(repeats):  # alternate, so drift on a noisy machine hits both alike
                for path in seconds:
                    started = time.perf_counter()
                    call(clients[path], raw[path])
                    seconds[path].append(time.perf_counter() - started)
            gate, direct = statistics.median(seconds["gate"]), statistics.median(seconds["direct"])
            rows.append({"protocol": protocol, "case": label, "gate_ms": gate * 1e3, "direct_ms": direct * 1e3})
            print(f"{protocol:4} {label:32} gate {gate * 1e3:9.2f} ms  direct {direct * 1e3:9.2f} ms", flush=True)
        for client in clients.values():
            client.close()
    return rows


def markdown(rows: list[dict], repeats: int, command: str) -> str:
    lines = ["## The gate's cost per request (`make bench`: `python -m bench.gate_cost`)", "",
             f"Machine: {machine()}; tiny model, onnxruntime flavor. Command: `{command}`.", "",
             "Each request alternately through the gate (public port) and straight to tritonserver's loopback port "
             f"behind it, in the same run; median of {repeats}. The cost is gate minus direct.", "",
             "| protocol | request | through the gate ms | direct ms | cost ms | ratio |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        cost = row["gate_ms"] - row["direct_ms"]
        lines.append(f"| {row['protocol']} | {row['case']} | {row['gate_ms']:.2f} | {row['direct_ms']:.2f} | "
                     f"{cost:+.2f} | {row['gate_ms'] / row['direct_ms']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.gate_cost", __doc__, "checkpoints/tiny", "build/onnx/fp32",
                              "the checkpoint its export came from")
    parser.add_argument("--repeats", type=int, default=9, help="requests per cell and path (default %(default)s)")
    args = parse_benchmark_args(parser, argv)
    with tempfile.TemporaryDirectory() as workdir:
        repository = assemble(Path(args.onnx_dir), args.checkpoint, Path(workdir) / "model_repository",
                              backend="onnxruntime", bls_instances=1)
        with running(repository, log_file=Path(workdir) / "server.log") as server:
            with Flux2Client(server.grpc, timeout_s=600) as warm:  # first requests load lazily: not measured
                warm.generate("warm up", height=1024, width=1024, seed=0, num_inference_steps=1)
            rows = measure(server, args.repeats)
    publish("gate_cost", markdown(rows, args.repeats, args.command), not args.no_write)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
