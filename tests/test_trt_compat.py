"""The TensorRT compatibility check: every exported graph (fp32 and bf16) passes it, and it
catches what TensorRT's ONNX parser would reject."""

from __future__ import annotations

import contextlib

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.export import profile_walk
from flux2_serving.export.profile_walk import LIMIT, walk_export
from flux2_serving.export.trt_compat import Report, check_graph, load_supported_ops, main, summary
from flux2_serving.modeling.loading import read_model_dims
from flux2_serving.serving import memory_plan


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


def test_the_export_s_line_says_what_was_checked_and_that_tensorrt_did_not_run(tmp_path):
    assert summary("text_encoder", Report(tmp_path / "g.onnx")) == \
        "TensorRT compatibility (operators, types, Q/DQ rules; no TensorRT run) text_encoder: ok"
    bad = Report(tmp_path / "g.onnx", problems=["DOUBLE tensor 'y'", "opset 21 outside 9..20"])
    assert summary("vae_decoder", bad).endswith("run) vae_decoder: DOUBLE tensor 'y'; opset 21 outside 9..20")


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


def test_half_precision_graphs_run_softmax_in_fp32(onnx_bf16, onnx_fp32):
    """Every Softmax of a bf16 graph reads fp32 (a Cast in front, one back after): where TensorRT does
    not fuse attention, a strongly typed engine computes each layer in its ONNX types. fp32 graphs have
    no such casts. The VAE graphs run their attention in 16 query slices (components.query_chunked_attention)."""
    for name in ("text_encoder", "transformer_prefill", "transformer_cached", "vae_encoder", "vae_decoder"):
        for folder, wrapped in ((onnx_bf16, True), (onnx_fp32, False)):
            proto = onnx.shape_inference.infer_shapes(onnx.load(str(folder / name / "model.onnx"),
                                                                load_external_data=False))
            types = {v.name: v.type.tensor_type.elem_type for v in proto.graph.value_info}
            producers = {out: node for node in proto.graph.node for out in node.output}
            softmaxes = [node for node in proto.graph.node if node.op_type == "Softmax"]
            assert softmaxes, name
            for node in softmaxes:
                assert types[node.input[0]] == onnx.TensorProto.FLOAT, (name, folder.name, node.name)
                cast = producers.get(node.input[0])
                assert (cast is not None and cast.op_type == "Cast" and cast.name.endswith("__to_fp32")) == wrapped
            if name.startswith("vae_"):
                assert len(softmaxes) == 16, (name, len(softmaxes))


def test_every_graph_fits_its_profile_maximum(onnx_fp32, tiny_checkpoint):
    """Every intermediate tensor of every graph at its TensorRT profile's maximum shapes (symbolic shape
    inference, nothing run): none over 2^31 - 1 elements (the transformers' attention scores excepted:
    fused, assumed), and the largest within the memory plan's activation estimate for that engine (the
    plan of this very model: fewer heads and channels than 9B, the same token counts)."""
    size = memory_plan.model_size(tiny_checkpoint)
    for walk in walk_export(onnx_fp32):
        print(walk)
        assert not walk.unresolved and not walk.over_limit, walk
        budget = memory_plan.activation_bytes(walk.graph, size, "fp32", DEFAULT_ENVELOPE)
        assert walk.largest_other[0] * 4 <= budget, (walk.graph, walk.largest_other, budget)
        if walk.graph.startswith("vae_"):  # not assumed fused: its scores must fit too
            assert walk.largest_score[0] <= LIMIT and walk.largest_score[0] * 4 <= budget, walk


def test_the_walk_finds_an_attention_too_large_for_tensorrt(tmp_path, tiny_checkpoint):
    """The VAE encoder exported without query slices: at 2048x2048 (the square profile it had before its
    profiles were bounded by area) its attention scores are [1, 1, 65536, 65536], over 2^31 - 1
    elements, and the walk says so."""
    # modeling.components and export.onnx_export import diffusers (heavy): only this test of the module needs them
    from flux2_serving.export.onnx_export import export_component
    from flux2_serving.modeling import components

    original = components.query_chunked_attention
    components.query_chunked_attention = lambda *a, **k: contextlib.nullcontext()
    try:
        path = export_component("vae_encoder", tiny_checkpoint, tmp_path, torch.float32,
                                read_model_dims(tiny_checkpoint))
    finally:
        components.query_chunked_attention = original
    result = profile_walk.walk(path, {"image": (1, 3, 2048, 2048)})
    assert result.largest_score[0] == 65536 * 65536 > LIMIT and result.over_limit
