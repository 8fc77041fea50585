"""The TensorRT compatibility check: every exported graph (fp32 and bf16) passes it, and it
catches what TensorRT's ONNX parser would reject."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from export.specs import COMPONENTS
from export.trt_compat import check_graph, load_supported_ops, main


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("component", COMPONENTS)
def test_exported_graphs_pass(request, dtype, component):
    onnx_dir = request.getfixturevalue(f"onnx_{dtype}")
    report = check_graph(onnx_dir / component / "model.onnx")
    assert report.ok, report.problems
    assert report.opset == 18
    assert sum(report.op_counts.values()) > 10


def test_bf16_graphs_are_bf16(onnx_bf16):
    for component in COMPONENTS:
        model = onnx.load(str(onnx_bf16 / component / "model.onnx"), load_external_data=False)
        float_io = [v.type.tensor_type.elem_type for v in list(model.graph.input) + list(model.graph.output)
                    if v.type.tensor_type.elem_type not in (TensorProto.INT64,)]
        assert float_io and set(float_io) == {TensorProto.BFLOAT16}, component


def test_supported_list_records_its_version():
    ops, meta = load_supported_ops()
    assert meta == {"tensorrt_version": "10.1", "max_opset": "20"}
    assert "BF16" in ops["MatMul"] and "Unique" not in ops


def _graph(tmp_path, nodes, opset=18, out_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", out_type, [None])])
    path = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), str(path))
    return path


def test_catches_double(tmp_path):
    path = _graph(tmp_path, [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.DOUBLE)],
                  out_type=TensorProto.DOUBLE)
    problems = " ".join(check_graph(path).problems)
    assert "DOUBLE tensor 'y'" in problems and "Cast to DOUBLE" in problems


def test_catches_unsupported_op_and_opset(tmp_path, capsys):
    path = _graph(tmp_path, [helper.make_node("Unique", ["x"], ["y"])], opset=21)
    report = check_graph(path)
    assert any("op Unique" in p for p in report.problems)
    assert any("opset 21 outside" in p for p in report.problems)
    assert main([str(path)]) == 1
    assert "problem(s)" in capsys.readouterr().out
