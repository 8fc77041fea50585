"""`python -m flux2_serving.export` and `python -m flux2_serving.export.build_engines` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE, engine_profiles
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.specs import graph_specs
from flux2_serving.export.build_engines import engine_name


def _run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_export_help():
    result = _run("flux2_serving.export", "--help")
    assert result.returncode == 0
    for word in ("--model", "--out", "--dtype", "fp32", "bf16", *COMPONENTS):
        assert word in result.stdout


def test_export_writes_five_graphs_with_progress(onnx_fp32):
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    assert set(manifest["graphs"]) == set(COMPONENTS)
    for name in COMPONENTS:
        assert (onnx_fp32 / name / "model.onnx").stat().st_size > 10_000
    log = (onnx_fp32 / "export.log").read_text()
    for index, name in enumerate(COMPONENTS, 1):
        assert f"[{index}/5] exporting {name} (fp32)" in log
        assert f"TensorRT compatibility (operators, types, Q/DQ rules; no TensorRT run) {name}: ok" in log


def test_build_engines_dry_run_prints_every_profile(onnx_bf16):
    result = _run("flux2_serving.export.build_engines", "--onnx-dir", str(onnx_bf16), "--dry-run")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in COMPONENTS:
        assert f"{name}:" in out and engine_name(name, "<trt>", "<sm>") in out
    # 256-1440 px output (16-90 tokens a side), opt 1024 px, 2 images per cached step, 512 text tokens,
    # up to 4096 reference tokens (one K/V tensor per block, no batch axis), 4 prompts per text encoder call.
    assert "latents         min [1, 16, 16, 128]  opt [1, 64, 64, 128]  max [2, 90, 90, 128]" in out
    assert "ref_kv_00       min [2, 0, 4, 16]  opt [2, 4096, 4, 16]  max [2, 4096, 4, 16]" in out
    assert "input_ids       min [1, 512]  opt [1, 512]  max [4, 512]" in out


def test_build_engines_without_tensorrt_fails_with_one_clear_line(onnx_bf16, tmp_path):
    result = _run("flux2_serving.export.build_engines", "--onnx-dir", str(onnx_bf16),
                  "--out", str(tmp_path / "engines"))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: TensorRT Python package not found")
    assert "tritonserver container" in lines[0]


def test_profiles_cover_every_dynamic_dim_in_order():
    dims = {"text_hidden": 4096, "heads": 32, "head_dim": 128, "kv_layers": 32, "in_channels": 128}
    for spec in graph_specs(dims).values():
        for profile in engine_profiles(spec, DEFAULT_ENVELOPE):
            for name, (lo, opt, hi) in profile.items():
                assert all(a <= b <= c for a, b, c in zip(lo, opt, hi, strict=True)), (spec.name, name)
    [cached] = engine_profiles(graph_specs(dims)["transformer_cached"])
    assert cached["ref_kv_31"][2] == (2, 4096, 32, 128)  # one reference of 1024x1024, shared by the images
    [prefill] = engine_profiles(graph_specs(dims)["transformer_prefill"])
    assert prefill["ref_latents"][0] == (1, 16, 128)
