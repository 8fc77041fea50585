"""FP8 graphs (export --quantize fp8, export/fp8.py) of the tiny checkpoint: TensorRT's Q/DQ rules hold,
the kept layers stay unquantized, the ONNX Q/DQ computes what ModelOpt's fake quant computes, storing
the weights as FP8 changes no output, and the served FP8 flavor (a real tritonserver, onnxruntime
runner) answers exactly what the same graphs give in-process."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import onnx
import pytest
import torch

from flux2_serving.clients.api import Flux2Client
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.fp8_recipe import TRANSFORMER_KEEP, kept
from flux2_serving.contract.tiers import FP8_ENGINES
from flux2_serving.export import fp8
from flux2_serving.export.trt_compat import check_graph
from flux2_serving.models.local import local_pipeline
from flux2_serving.models.request_inputs import parse
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble
from tests.support import CACHE_BYTES, random_image, raw_request


def test_fp8_graphs_pass_the_tensorrt_check_and_carry_fp8_weights(onnx_fp8):
    manifest = json.loads((onnx_fp8 / "manifest.json").read_text())
    assert manifest["quantization"] == "fp8" and sorted(manifest["quantized"]) == sorted(FP8_ENGINES)
    for name in manifest["graphs"]:
        report = check_graph(onnx_fp8 / name / "model.onnx")
        assert report.ok, (name, report.problems[:5])
        counts = fp8.fp8_counts(onnx.load(str(onnx_fp8 / name / "model.onnx")))
        if name in FP8_ENGINES:
            assert report.opset == fp8.FP8_OPSET
            assert counts["fp8_weights"] > 0 and counts["QuantizeLinear"] > 0, (name, counts)
        else:  # the VAE stays in the export dtype
            assert counts == {"QuantizeLinear": 0, "DequantizeLinear": 0, "fp8_weights": 0}, (name, counts)


def test_the_layers_nvidia_keeps_stay_unquantized(onnx_fp8):
    proto = onnx.load(str(onnx_fp8 / "transformer_cached" / "model.onnx"))
    fp8_weights = [t.name for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT8E4M3FN]
    # Named after the weight (transformer.<module path>.weight.fp8): the wrapper's prefix stripped, the
    # module path must not be one ModelOpt's FLUX filter keeps, and the blocks' attention is FP8.
    paths = [name.removeprefix("transformer.").removesuffix(".weight.fp8") for name in fp8_weights]
    assert paths and not [p for p in paths if kept(p, TRANSFORMER_KEEP)], paths
    assert any("attn.to_q" in p for p in paths) and any("single_transformer_blocks" in p for p in paths), paths
    high = {t.name: t.data_type for t in proto.graph.initializer
            if t.name.endswith(("stream_modulation_img.linear.weight", "norm_out.linear.weight"))}
    assert len(high) == 2 and set(high.values()) == {onnx.TensorProto.FLOAT}, high  # still fp32 weights


def test_onnx_qdq_equals_modelopt_fake_quant_and_storing_fp8_weights_changes_nothing(tmp_path):
    import modelopt.torch.quantization as mtq
    import onnxruntime as ort

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 32)).eval()
    x = torch.randn(8, 64)
    mtq.quantize(model, fp8.fp8_config(), forward_loop=lambda m: m(x))
    with torch.no_grad():
        expected = model(x).numpy()
    with torch.no_grad(), fp8.export_mode():
        program = torch.onnx.export(model, (x,), dynamo=True, opset_version=fp8.FP8_OPSET,
                                    custom_translation_table=fp8.translation_table())
    path = tmp_path / "qdq.onnx"
    program.save(str(path))
    proto = onnx.load(str(path))

    def run(model_proto):
        session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]

    as_qdq = run(proto)
    # ModelOpt multiplies by 448/amax where ONNX divides by amax/448: equal up to float rounding.
    np.testing.assert_allclose(as_qdq, expected, rtol=1e-5, atol=1e-6)
    assert fp8.store_fp8_weights(proto) == 2
    assert fp8.fp8_counts(proto)["fp8_weights"] == 2
    assert np.array_equal(run(proto), as_qdq)  # the same FP8 weights, bit for bit


def test_calibration_prompts_and_references():
    prompts = fp8.calibration_prompts(fp8.DEFAULT_CALIBRATION_SIZE)
    assert len(set(prompts)) == 128 and len({p.split(" on ")[0] for p in prompts[:8]}) > 4
    assert [len(fp8.calibration_references(i, 64)) for i in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="between 1 and 128"):
        fp8.calibration_prompts(129)


@pytest.fixture(scope="module")
def fp8_server(tmp_path_factory, onnx_fp8, tiny_checkpoint):
    workdir = tmp_path_factory.mktemp("triton_fp8")
    repository = assemble(onnx_fp8, tiny_checkpoint, workdir / "model_repository", backend="onnxruntime",
                          bls_instances=1, envelope=replace(DEFAULT_ENVELOPE, reference_cache_bytes=CACHE_BYTES))
    with running(repository, log_file=workdir / "server.log") as server:
        yield server


@pytest.mark.parametrize("refs", [[], [(128, 96), (96, 160)]], ids=["text_to_image", "two_references"])
def test_served_fp8_equals_the_same_graphs_in_process(fp8_server, onnx_fp8, tiny_checkpoint, refs):
    images = [random_image(w, h, seed=i) for i, (w, h) in enumerate(refs)]
    options = dict(height=256, width=256, seed=31, num_inference_steps=3)
    with Flux2Client(fp8_server.grpc, "grpc") as client:
        served = np.stack([np.asarray(image) for image in client.generate("an fp8 fox", images, **options)])
    pipeline, _ = local_pipeline(onnx_fp8, tiny_checkpoint)
    in_process = pipeline(parse(raw_request("an fp8 fox", images, **options), pipeline.limits)).images
    assert served.shape == in_process.shape and np.array_equal(served, in_process)


def test_fp8_images_stay_near_fp32(onnx_fp8, onnx_fp32, tiny_checkpoint):
    """A sanity bound on random tiny weights (the measured table is bench/fp8_quality.py's, BENCHMARKS.md)."""
    inputs = raw_request("a near fox", [random_image(128, 128, seed=3)], height=256, width=256, seed=5)
    results = []
    for onnx_dir in (onnx_fp8, onnx_fp32):
        pipeline, _ = local_pipeline(onnx_dir, tiny_checkpoint)
        results.append(pipeline(parse(inputs, pipeline.limits)).images.astype(np.float64))
    diff = np.abs(results[0] - results[1])
    print(f"FP8 vs fp32 on the tiny checkpoint: mean {diff.mean():.2f}, max {diff.max():.0f} levels of 255")
    assert 0 < diff.mean() < 16


def test_the_torch_flavor_serves_an_fp8_export_with_fp8_layers(tmp_path, onnx_fp8, tiny_checkpoint):
    """--backend torch on an FP8 export: the quantized components run models/fp8_linear.py's layers (dynamic
    input scales, so near, not equal to, the calibrated ONNX graphs), the VAE runs as exported."""
    repository = assemble(onnx_fp8, tiny_checkpoint, tmp_path / "model_repository", backend="torch", bls_instances=1,
                          envelope=replace(DEFAULT_ENVELOPE, reference_cache_bytes=CACHE_BYTES))
    quantized = {name for name in FP8_ENGINES + ("vae_encoder", "vae_decoder")
                 if 'key: "quantize"' in (repository / name / "config.pbtxt").read_text()}
    assert quantized == set(FP8_ENGINES)
    options = dict(height=256, width=256, seed=8, num_inference_steps=2)
    with running(repository, log_file=tmp_path / "server.log") as server, Flux2Client(server.grpc, "grpc") as client:
        served = np.asarray(client.generate("a torch fp8 fox", **options)[0]).astype(np.float64)
    pipeline, _ = local_pipeline(onnx_fp8, tiny_checkpoint)
    onnx_image = pipeline(parse(raw_request("a torch fp8 fox", **options), pipeline.limits)).images[0]
    onnx_image = onnx_image.astype(np.float64)
    diff = np.abs(served - onnx_image)
    print(f"torch FP8 vs ONNX FP8: mean {diff.mean():.3f}, max {diff.max():.0f} levels")
    assert diff.mean() < 2 and diff.max() <= 16
