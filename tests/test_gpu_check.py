"""`make gpu-check` on the CPU: the prepared GPU script runs end to end at the tiny size, so it is
known to work before a GPU is ever used (there: bf16, klein 9B dims for stages c-f)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import venv
from pathlib import Path

from bench.gpu_check import ROOT, STAGES, link_checkout, stage_limit


def test_gpu_check_runs_its_cpu_stages(tmp_path):
    out = tmp_path / "gpu_check"
    benchmarks = tmp_path / "BENCHMARKS.md"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out),
                          "--benchmarks", str(benchmarks), "--repeats", "1"],
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:], run.stderr[-3000:])
    results = json.loads((out / "gpu_check.json").read_text())
    stages = results["stages"]
    assert stages["c"] == {"skipped": "needs a GPU"}
    env, served, e2e, export = stages["a"], stages["b"], stages["d"], stages["e"]
    assert stages["f"]["ok"] and stages["f"]["fp8"]["paths"] == {"fallback": 28}, stages["f"]
    assert env["ok"] and env["unresolved"] == {}  # tritonserver and this Python's stub resolve every library
    assert served["ok"], served
    assert set(served["cases"]) == {"text_to_image", "one_reference", "three_references", "two_images_per_prompt"}
    assert served["cache_hit_equals_miss"] and served["bls_output_devices"].keys() == {"cpu"}
    assert e2e["ok"] and [row["case"] for row in e2e["rows"]] == ["text_to_image", "one_reference", "four_references"]
    for row in e2e["rows"]:  # same random weights served and in diffusers: the same image
        assert row["vs_served"]["ok"] and 0 < row["outside_components_s"] < row["served_s"]
    assert export["ok"] and export["trt_check_ok"], export
    assert run.returncode == 0
    section = benchmarks.read_text()
    assert "<!-- gpu_check:begin -->" in section and "| d served | ok |" in section


def test_fp8_stage_cpu_rehearsal(tmp_path):
    """Stage f alone on the CPU: the tiny transformer step in bf16, then with its linears in FP8 on the fallback
    path (no FP8 matmul on a CPU), compared; the figures and the BENCHMARKS table it writes."""
    out, benchmarks = tmp_path / "gpu_check", tmp_path / "BENCHMARKS.md"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--stages", "f",
                          "--out", str(out), "--benchmarks", str(benchmarks)],
                         capture_output=True, text=True, timeout=600)
    print(run.stdout[-3000:], run.stderr[-3000:], (out / "stage_f.log").read_text()[-3000:])
    assert run.returncode == 0
    fp8 = json.loads((out / "gpu_check.json").read_text())["stages"]["f"]
    assert fp8["ok"], fp8
    assert fp8["size"] == "tiny" and fp8["dtype"] == "bf16" and not fp8["fp8_matmul_device"]
    assert fp8["fp8"]["paths"] == {"fallback": 28} and fp8["fp8_linears"] == 28 and fp8["kept_linears"] == 9
    figures = [fp8[p][k] for p in ("bf16", "fp8") for k in ("median_ms", "peak_gib", "weights_gib")]
    figures += [fp8[c][k] for c in ("step_output", "latents_after_steps", "image")
                for k in ("mean_abs", "max_abs", "rel_l2", "psnr_db")]
    assert all(isinstance(v, float) and math.isfinite(v) and v > 0 for v in figures), fp8
    assert len(fp8["bf16"]["times_ms"]) == len(fp8["fp8"]["times_ms"]) == fp8["repeats"] == 5
    assert fp8["fp8"]["weights_gib"] < fp8["bf16"]["weights_gib"]  # 1-byte weights in 28 of 37 layers
    # FP8 rounding, not a broken layer: the step output stays close to bf16's (measured ~65 dB, 0.07% of the
    # range per value), the decoded 64x64 image within a few levels.
    assert fp8["step_output"]["psnr_db"] > 40 and fp8["step_output"]["rel_l2"] < 0.05
    assert fp8["image"]["shape"] == [1, 3, 64, 64] and fp8["image"]["mean_abs"] < 4
    section = benchmarks.read_text()
    assert "<!-- gpu_check:begin -->" in section and "| f fp8 | ok |" in section
    assert "| precision | step (ms) | peak memory (GiB) | weights (GiB) | matmul path (layers) |" in section
    assert "| FP8 E4M3, per-tensor scales |" in section and "`fallback` x 28" in section
    assert "No FP8 matmul ran here" in section


def test_stage_time_boxes_fit_the_budget():
    """The stages' time boxes sum to the budget, whichever stages run (a box beyond the budget cut the last stage)."""
    for stages in ("abcfde", "abfde", "abcde", "ab", "e", "f"):
        boxes = [stage_limit(letter, 480, stages) for letter in stages]
        assert abs(sum(boxes) - 480) < 1e-6 and min(boxes) >= 30, (stages, boxes)
    assert "".join(STAGES) == "abcfde"  # f runs after the probe
    assert stage_limit("f", 480) == 60


def test_the_bundle_venv_imports_the_top_level_folders_without_an_install(tmp_path):
    """The GPU machine's venv (bench.gpu_check.enter_bundle_venv) has this checkout linked, not installed: the
    export/ and clients/ folders still import as flux2_serving.export and .clients, also from the checkout's
    root, where python -m finds flux2_serving/ (which holds neither) first."""
    venv.create(tmp_path / "venv", with_pip=False, symlinks=True)
    python = str(tmp_path / "venv" / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    link_checkout(Path(purelib))
    code = ("import flux2_serving.export.build_engines as b, flux2_serving.clients as c, bench; "
            "print(b.__file__); print(c.__path__[0])")
    for cwd in (ROOT, tmp_path):
        run = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=cwd)
        assert run.returncode == 0, run.stderr
        assert run.stdout.split() == [str(ROOT / "export" / "build_engines.py"), str(ROOT / "clients")]

