"""Check, without TensorRT, that exported graphs are within what TensorRT's ONNX parser takes.

Checks per graph: `onnx.checker` and strict shape inference pass; the opset is within the
parser's range; every operator (subgraphs included) is in the parser's supported list
(`trt_supported_ops.tsv`, with the TensorRT version it is from); the floating-point type
each operator sees is one the parser lists for it; no DOUBLE tensor anywhere (TensorRT
has no float64). This runs on fp32 and bf16 graphs alike, also where onnxruntime on CPU
cannot execute bf16.

Usage: python -m flux2_serving.export.trt_compat DIR_OR_ONNX [...]
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from ..contract.cli_help import command_parser

SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_supported_ops.tsv")
FLOAT_TYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
}


def load_supported_ops(path: Path = SUPPORTED_OPS_FILE) -> tuple[dict[str, set[str]], dict[str, str]]:
    """-> ({op: {types}}, {'tensorrt_version': ..., 'max_opset': ...})."""
    ops, meta = {}, {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.split("\t")
        if key in ("tensorrt_version", "max_opset"):
            meta[key] = value
        else:
            ops[key] = set(value.split(","))
    return ops, meta


@dataclass
class Report:
    path: Path
    opset: int = 0
    op_counts: Counter = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _graphs(graph: onnx.GraphProto):
    """The graph and every subgraph (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _value_types(graph: onnx.GraphProto) -> dict[str, int]:
    types = {}
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    return types


def check_graph(path: str | Path) -> Report:
    path = Path(path)
    report = Report(path)
    supported, meta = load_supported_ops()
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except Exception as exc:  # any checker failure is a finding
        report.problems.append(f"onnx.checker: {exc}")
    model = onnx.load(str(path), load_external_data=False)
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as exc:  # any parser failure is a finding of the report, not a crash
        report.problems.append(f"shape inference: {exc}")
    report.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if not 9 <= report.opset <= int(meta["max_opset"]):
        report.problems.append(
            f"opset {report.opset} outside TensorRT {meta['tensorrt_version']}'s 9..{meta['max_opset']}")
    if model.functions:
        report.problems.append(f"{len(model.functions)} local ONNX functions (inline them)")

    for graph in _graphs(model.graph):
        types = _value_types(graph)
        for name, elem in types.items():
            if elem == TensorProto.DOUBLE:
                report.problems.append(f"DOUBLE tensor {name!r}")
        for node in graph.node:
            report.op_counts[node.op_type] += 1
            if node.domain not in ("", "ai.onnx"):
                report.problems.append(f"custom-domain op {node.domain}::{node.op_type} ({node.name})")
                continue
            if node.op_type not in supported:
                report.problems.append(f"op {node.op_type} ({node.name}) not in TensorRT's supported list")
                continue
            for attr in node.attribute:
                if attr.name == "to" and attr.i == TensorProto.DOUBLE:
                    report.problems.append(f"Cast to DOUBLE ({node.name})")
                if attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == TensorProto.DOUBLE:
                    report.problems.append(f"DOUBLE constant ({node.name})")
            float_inputs = {FLOAT_TYPES[types[i]] for i in node.input if types.get(i) in FLOAT_TYPES}
            missing = float_inputs - supported[node.op_type]
            if missing:
                report.problems.append(f"op {node.op_type} ({node.name}) on {sorted(missing)}, TensorRT lists "
                                       f"{sorted(supported[node.op_type])}")
    return report


def find_graphs(paths) -> list[Path]:
    found = []
    for p in map(Path, paths):
        found.extend(sorted(p.rglob("*.onnx")) if p.is_dir() else [p])
    return found


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.export.trt_compat", __doc__)
    parser.add_argument("paths", nargs="+", help="ONNX files or directories searched for *.onnx")
    args = parser.parse_args(argv)
    _, meta = load_supported_ops()
    graphs = find_graphs(args.paths)
    if not graphs:
        print("no .onnx files found", file=sys.stderr)
        return 2
    failed = 0
    print(f"TensorRT ONNX parser support list: TensorRT {meta['tensorrt_version']}, opset <= {meta['max_opset']}")
    for graph in graphs:
        report = check_graph(graph)
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(f"{graph}: opset {report.opset}, {sum(report.op_counts.values())} nodes, "
              f"{len(report.op_counts)} op types: {status}")
        for problem in report.problems[:20]:
            print(f"  - {problem}")
        failed += not report.ok
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
