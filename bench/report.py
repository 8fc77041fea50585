"""Shared pieces of the benchmarks: the machine's description, process memory, and
BENCHMARKS.md sections that each benchmark rewrites without touching the others'."""

from __future__ import annotations

import argparse
import os
import platform
import re
import sys
from pathlib import Path

from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.server.launch import process_table

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "?"
    return (f"{cpu}, {os.cpu_count()} cores available, {memory_gib:.0f} GiB RAM, Debian {debian}, "
            f"Python {platform.python_version()}")


def _status_kib(pid: int, key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text(), re.M)
    return int(match.group(1)) if match else 0


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (tritonserver starts one Python-backend stub per model instance)."""
    children: dict[int, list[int]] = {}
    for child, (_, ppid, _) in process_table().items():
        children.setdefault(ppid, []).append(child)
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def tree_memory_gib(pid: int) -> dict[str, float]:
    """Resident memory of a process tree: now (sum of VmRSS) and the sum of each process's peak (VmHWM),
    an upper bound of the tree's peak, since the processes need not peak at the same moment."""
    rss = hwm = 0
    for member in process_tree(pid):
        try:
            rss += _status_kib(member, "VmRSS")
            hwm += _status_kib(member, "VmHWM")
        except OSError:
            continue
    return {"rss_gib": rss / 2**20, "peak_gib": hwm / 2**20}


def write_section(name: str, text: str, path: Path = ROOT / "BENCHMARKS.md") -> Path:
    """Replace (or append) the section between this benchmark's markers in BENCHMARKS.md."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    block = f"{begin}\n{text.strip()}\n{end}"
    current = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEach section below is written by the command it names; rerun that command to refresh it.\n")
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        current = head + block + rest.split(end, 1)[1]
    else:
        current = current.rstrip() + "\n\n" + block + "\n"
    path.write_text(current)
    return path


def probe_markdown(result: dict) -> str:
    """The '## GPU probe' section of BENCHMARKS.md from bench.gpu_probe's result."""
    card = result["device"]
    if result["device_memory_gib"]:
        card += f" ({result['device_memory_gib']:.1f} GiB)"
    cuda = f" (CUDA {result['cuda']})" if result["device_type"] == "cuda" else ""
    lines = [
        "## GPU probe",
        "",
        f"Card: **{card}**; torch {result['torch']}{cuda}, diffusers {result['diffusers']}, "
        f"Python {result['python']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Random-weight `Flux2Transformer2DModel` ({result['size']}, {result['dtype']}): "
        f"{count_text(result['weights']['parameters'])} parameters, {size_text(result['weights']['bytes'])} of "
        f"weights, built in {result['build_s']:.1f} s. Median of {result['repeats']} calls after {result['warmup']} "
        f"warm-up call(s) ({result['timer']}), batch 1, under `torch.inference_mode()`; peak memory is "
        f"{result['memory']} per measurement (weights and held inputs included).",
        "",
        "| measurement | shape | median ms | peak memory GiB |",
        "|---|---|---:|---:|",
    ]
    for m in result["measurements"]:
        refs = f"{m['refs']} ref" + ("" if m["refs"] == 1 else "s")
        if "error" in m:
            lines.append(f"| {m['label']}, {refs} | {m['shape']} | {m['error']} | |")
        else:
            lines.append(f"| {m['label']}, {refs} | {m['shape']} | {m['median_ms']:.2f} | {m['peak_gib']:.2f} |")
    checks = result["checks"]
    if checks["cached_max_abs_diff"]:
        parts = [f"{n} ref(s) {d:.3g} (max |diffusers| {checks['cached_max_abs_ref'][n]:.3g})"
                 for n, d in checks["cached_max_abs_diff"].items()]
        lines += ["", "Max |ours - diffusers| of the cached step on the same inputs: " + "; ".join(parts) + "."]
    if checks["kv_max_abs_diff"]:
        parts = [f"{n} ref(s) {d:.3g}" for n, d in checks["kv_max_abs_diff"].items()]
        lines += ["", "Max |prefill K/V - diffusers' extracted K/V| (first/last double and single blocks): "
                  + "; ".join(parts) + "."]
    lines += ["", f"Total run time {result['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def count_text(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def size_text(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 0.1 * 2**30 else f"{n / 2**20:.2f} MiB"


def benchmark_parser(prog: str, doc: str, model: str, onnx_dir: str, model_help: str):
    """The argument parser every make-bench script starts from: its docstring as help, the model and
    its fp32 export, --no-write. parse_args(argv) of it gives args.command too (parse_benchmark_args)."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0], epilog=doc.split("\n\n", 1)[1],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--model", "--checkpoint", dest="checkpoint", default=model, help=model_help)
    parser.add_argument("--onnx-dir", default=onnx_dir, help="its fp32 export")
    parser.add_argument("--no-write", action="store_true", help="print the tables, leave BENCHMARKS.md alone")
    return parser


def parse_benchmark_args(parser, argv=None):
    """parse_args, plus args.command: how the numbers were made, as BENCHMARKS.md states it."""
    args = parser.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    args.command = "make bench" if os.environ.get("MAKELEVEL") else " ".join([parser.prog, *given])
    return args


def publish(section: str, text: str, write: bool = True) -> None:
    """Print a benchmark's markdown and, unless --no-write, put it in its BENCHMARKS.md section."""
    print(text)
    if write:
        print(f"[{section}] wrote {write_section(section, text)}", flush=True)
