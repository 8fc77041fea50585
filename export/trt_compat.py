"""Check, without TensorRT, that exported graphs are within what TensorRT's ONNX parser takes.

Checks per graph: `onnx.checker` and strict shape inference pass; the opset is within the
parser's range; every operator (subgraphs included) is in the parser's supported list
(`trt_supported_ops.tsv`, with the TensorRT version it is from); the floating-point type
each operator sees is one the parser lists for it; no DOUBLE tensor anywhere (TensorRT
has no float64). This runs on fp32 and bf16 graphs alike, also where onnxruntime on CPU
cannot execute bf16.

FP8 graphs (export --quantize fp8) also get the Q/DQ rules of TensorRT's explicit quantization
(TensorRT developer guide, "Working with Quantized Types": Q/DQ scales must be build-time constants,
FP8 is per-tensor here, a strongly typed network takes the FP8 types from the graph): the data input
of QuantizeLinear is fp32/fp16/bf16 and of DequantizeLinear FP8; every scale is a constant scalar;
every zero point (a DequantizeLinear may omit it) is a constant FLOAT8E4M3FN zero; every
QuantizeLinear feeds DequantizeLinears only;
every FP8 weight feeds a DequantizeLinear; the opset is at least 19 (FP8 Q/DQ).

Usage: python -m flux2_serving.export.trt_compat DIR_OR_ONNX [...]
"""

from __future__ import annotations

import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from onnx import TensorProto

from flux2_serving.contract.cli_help import command_parser

SUPPORTED_OPS_FILE = Path(__file__).with_name("trt_supported_ops.tsv")
FLOAT_TYPES = {
    TensorProto.FLOAT: "FP32",
    TensorProto.FLOAT16: "FP16",
    TensorProto.BFLOAT16: "BF16",
    TensorProto.DOUBLE: "DOUBLE",
    TensorProto.FLOAT8E4M3FN: "FP8",
}
QDQ = ("QuantizeLinear", "DequantizeLinear")
# What check_graph checks, in the words a log line uses: the graph against TensorRT's ONNX parser rules
# (operators, their types, Q/DQ), read from trt_supported_ops.tsv; TensorRT itself does not run.
CHECKED = "TensorRT compatibility (operators, types, Q/DQ rules; no TensorRT run)"


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


def summary(name: str, report: Report) -> str:
    """One line for a graph's report (the export prints one per graph): `CHECKED name: ok`, or its first problems."""
    return f"{CHECKED} {name}: " + ("ok" if report.ok else "; ".join(report.problems[:5]))


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
            # TensorRT's list types a Q/DQ by its data input (the scale and zero point: see qdq_problems).
            typed = node.input[:1] if node.op_type in QDQ else node.input
            float_inputs = {FLOAT_TYPES[types[i]] for i in typed if types.get(i) in FLOAT_TYPES}
            missing = float_inputs - supported[node.op_type]
            if missing:
                report.problems.append(f"op {node.op_type} ({node.name}) on {sorted(missing)}, TensorRT lists "
                                       f"{sorted(supported[node.op_type])}")
        report.problems.extend(qdq_problems(graph, report.opset))
    return report


def qdq_problems(graph: onnx.GraphProto, opset: int) -> list[str]:
    """TensorRT's rules for FP8 Q/DQ (module docstring) broken in `graph`, one line each."""
    constants = {init.name: init for init in graph.initializer}
    for node in graph.node:  # Constant nodes are constants too
        if node.op_type == "Constant" and node.attribute and node.attribute[0].type == onnx.AttributeProto.TENSOR:
            constants[node.output[0]] = node.attribute[0].t
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    problems = []
    quantize_nodes = [node for node in graph.node if node.op_type in QDQ]
    if quantize_nodes and opset < 19:
        problems.append(f"FP8 Q/DQ needs opset >= 19, the graph has {opset}")
    for node in quantize_nodes:
        scale = constants.get(node.input[1]) if len(node.input) > 1 else None
        if scale is None or len(scale.dims) != 0:
            problems.append(f"{node.op_type} ({node.name}): the scale is not a constant scalar (per-tensor FP8)")
        # A QuantizeLinear's zero point sets its output type (opset 19); a DequantizeLinear may omit it.
        has_zero = len(node.input) > 2 and node.input[2]
        zero = constants.get(node.input[2]) if has_zero else None
        if (has_zero or node.op_type == "QuantizeLinear") and (
                zero is None or zero.data_type != TensorProto.FLOAT8E4M3FN
                or any(onnx.numpy_helper.to_array(zero).astype("float32").ravel())):
            problems.append(f"{node.op_type} ({node.name}): the zero point is not a constant FLOAT8E4M3FN zero")
        if node.op_type == "QuantizeLinear":
            others = [c.op_type for c in consumers.get(node.output[0], []) if c.op_type != "DequantizeLinear"]
            if others:
                problems.append(f"QuantizeLinear ({node.name}) feeds {sorted(set(others))}, not only DequantizeLinear")
    for init in graph.initializer:
        if init.data_type == TensorProto.FLOAT8E4M3FN and init.dims:
            users = {c.op_type for c in consumers.get(init.name, [])}
            if users - {"DequantizeLinear"}:
                problems.append(f"FP8 weight {init.name!r} feeds {sorted(users)}, not a DequantizeLinear")
    return problems


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
