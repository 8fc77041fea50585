"""python -m flux2_serving.export.engine_check on the tiny fp32 export: the onnxruntime half (Polygraphy's
OnnxrtRunner) runs; the TensorRT half is reported as not run. No TensorRT here: its half is never exercised or
imitated, except the layer counting, fed a hand-written engine-inspector JSON in the two layouts TensorRT documents.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
from polygraphy.json import load_json

from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.export import engine_check as E

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    # `python -m flux2_serving.export.engine_check ARGS` with `import tensorrt` failing, whether or not it is
    # installed here.
    code = ("import runpy, sys; sys.modules['tensorrt'] = None; "
            f"sys.argv = ['engine_check', *{list(args)!r}]; "
            "runpy.run_module('flux2_serving.export.engine_check', run_name='__main__', alter_sys=True)")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_without_tensorrt_the_check_of_engines_fails_in_one_line(onnx_fp32, tmp_path):
    """A check of engines that cannot run them must not pass (make engine-check on a host without TensorRT)."""
    result = _run("--onnx-dir", str(onnx_fp32), "--out", str(tmp_path), "--engines-dir", str(tmp_path / "none"))
    assert result.returncode == 2 and result.stdout == "", result.stdout[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "TensorRT not installed here" in lines[0] and "--onnxruntime-only" in lines[0], lines
    assert not (tmp_path / "report.json").exists()


def test_onnxruntime_half_runs_every_graph_and_tensorrt_half_is_reported_not_run(onnx_fp32, tmp_path):
    result = _run("--onnx-dir", str(onnx_fp32), "--out", str(tmp_path), "--engines-dir", str(tmp_path / "none"),
                  "--onnxruntime-only")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "onnxruntime half only (--onnxruntime-only)"

    dims = read_manifest(onnx_fp32).dims
    kv = [2, 4096, dims["heads"], dims["head_dim"]]  # opt: one 1024^2 reference, 64x64 latents, 512 text tokens
    expected = {
        "text_encoder": {"prompt_embeds": [1, 512, 3 * dims["text_hidden"]]},
        "vae_encoder": {"ref_latents": [1, 4096, 128]},
        "transformer_prefill": {f"ref_kv_{i:02d}": kv for i in range(dims["kv_layers"])},
        "transformer_cached": {"noise_pred": [1, 64, 64, 128]},
        "vae_decoder": {"image": [1, 3, 1024, 1024]},
    }
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["passed"] and report["shapes"] == "opt"
    assert report["tensorrt"] == {"ran": False, "reason": "--onnxruntime-only"}
    assert set(report["components"]) == set(expected)
    for name, outputs in expected.items():
        entry = report["components"][name]
        assert entry["passed"] and entry["runners"] == ["onnxruntime"], (name, entry)
        assert entry["tensorrt"] == {"ran": False, "reason": "--onnxruntime-only"}
        got = entry["onnxruntime"]["outputs"]
        assert {k: o["shape"] for k, o in got.items()} == outputs, name
        assert all(o["finite"] and o["dtype"] == "float32" for o in got.values()), name

    # The recorded inputs: Polygraphy's JSON, a list of feed dicts (what `polygraphy run --load-inputs` reads).
    feeds = load_json(str(tmp_path / "text_encoder.inputs.json"))
    assert isinstance(feeds, list) and len(feeds) == 1
    ids = feeds[0]["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (1, 512) and 0 <= ids.min() and ids.max() < dims["vocab_size"]
    empty, cached = load_json(str(tmp_path / "transformer_cached.inputs.json"))
    assert cached["img_ids"][5, 7].tolist() == [0, 5, 7, 0] and cached["txt_ids"][9].tolist() == [0, 0, 0, 9]
    # The cached step runs first with zero reference tokens, as every text-to-image request does (its profile's
    # minimum on that axis is 0); onnxruntime ran it, and a TensorRT check runs it before anything else.
    assert empty["ref_kv_00"].shape == (2, 0, dims["heads"], dims["head_dim"])
    assert empty["latents"].shape == cached["latents"].shape
    assert report["components"]["transformer_cached"]["empty_axes_first"]["ref_kv_00"] == list(empty["ref_kv_00"].shape)
    assert "empty_axes_first" not in report["components"]["vae_decoder"]


def test_comparison_fails_on_a_perturbed_output(onnx_fp32):
    """The same recorded inputs through onnxruntime twice, one output perturbed: beyond the fp32 tolerance fails."""
    manifest = read_manifest(onnx_fp32)
    feed = E.record_inputs(manifest.specs["transformer_cached"], manifest.dims, "min")
    graph = str(onnx_fp32 / manifest.paths["transformer_cached"])
    reference = E.run(OnnxrtRunner(SessionFromOnnx(graph)), [feed])
    check = E.tolerance("fp32", "transformer_cached")
    assert check == ("elemwise", 1e-3, 1e-3)

    def candidate(delta: float):
        results = E.run(OnnxrtRunner(SessionFromOnnx(graph)), [feed])
        iteration = results[0][1][0]
        out = iteration["noise_pred"].copy()
        out.flat[123] += delta
        iteration["noise_pred"] = out
        return results

    same = E.compare(candidate(0.0), reference, check)
    assert same["passed"] and same["outputs"]["noise_pred"]["max_abs"] == 0.0
    assert E.compare(candidate(1e-4), reference, check)["passed"]  # within atol
    off = E.compare(candidate(0.5), reference, check)
    assert not off["passed"] and not off["outputs"]["noise_pred"]["passed"]
    assert off["outputs"]["noise_pred"]["max_abs"] == pytest.approx(0.5, rel=1e-5)


def test_bf16_export_needs_an_fp32_reference_and_rounds_the_inputs(onnx_fp32, tmp_path):
    """A bf16 export's graphs do not run in onnxruntime on the CPU: without --reference-onnx-dir one line and
    exit 2; with the fp32 export the same model's fp32 graphs run on inputs rounded to bf16."""
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    bf16 = tmp_path / "onnx_bf16"
    bf16.mkdir()
    (bf16 / "manifest.json").write_text(json.dumps({**manifest, "dtype": "bf16"}))

    alone = _run("--onnx-dir", str(bf16), "--out", str(tmp_path / "a"))
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines()[-1].startswith("error: onnxruntime needs fp32 graphs")
    assert "--reference-onnx-dir" in alone.stderr

    result = _run("--onnx-dir", str(bf16), "--reference-onnx-dir", str(onnx_fp32), "--out", str(tmp_path / "b"),
                  "--components", "vae_decoder", "--shapes", "min", "--onnxruntime-only")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["dtype"] == "bf16" and list(report["components"]) == ["vae_decoder"]
    assert report["components"]["vae_decoder"]["onnxruntime"]["outputs"]["image"]["shape"] == [1, 3, 256, 256]
    latents = load_json(str(tmp_path / "b" / "vae_decoder.inputs.json"))[0]["latents"]
    assert latents.dtype == np.float32 and not (latents.view(np.uint32) & 0xFFFF).any()  # bf16 values
    assert np.abs(latents).max() > 0


class _Inspector:
    def __init__(self, layers):
        self.layers = layers

    def get_engine_information(self, fmt):
        assert fmt == "JSON"
        return json.dumps({"Layers": self.layers, "Bindings": []})


@pytest.mark.parametrize("detailed", [False, True])
def test_layer_summary_counts_attention_myelin_and_fp32(detailed):
    """Engine-inspector JSON as TensorRT writes it: layer names only (ProfilingVerbosity.LAYER_NAMES_ONLY, the
    default) or one dict per layer (DETAILED; TensorRT 10 "Format/Datatype", 11 "Datatype")."""
    names = ["node_linear", "node_sdpa_fmha_v2", "{ForeignNode[node_softmax...node_matmul_3]}", "node_cast"]
    layers = names
    if detailed:
        bf16, fp32 = [{"Format/Datatype": "Row major linear BF16"}], [{"Format/Datatype": "Row major linear FP32"}]
        layers = [{"Name": names[0], "LayerType": "Gemm", "Outputs": bf16},
                  {"Name": names[1], "LayerType": "CaskFusedMHA", "Outputs": bf16},
                  {"Name": names[2], "LayerType": "Myelin", "Outputs": [{"Datatype": "FP32", "Format": "Row major"}]},
                  {"Name": names[3], "LayerType": "Reformat", "Outputs": fp32}]
    trt = SimpleNamespace(LayerInformationFormat=SimpleNamespace(JSON="JSON"))
    engine = SimpleNamespace(create_engine_inspector=lambda: _Inspector(layers))
    summary = E.layer_summary(trt, engine)
    assert summary == {"layers": 4, "attention": 1, "myelin": 1, "fp32_layers": 2 if detailed else None,
                       "detailed": detailed}
    line = E.summary_line(Path("transformer_cached.trt10.13.0.sm90.plan"), summary)
    assert line.startswith("transformer_cached.trt10.13.0.sm90.plan: 4 layers, "
                           "1 fused attention (mha/fmha/attention), 1 Myelin")
    assert ("2 with FP32 outputs" in line) == detailed
