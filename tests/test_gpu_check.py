"""`make gpu-check` on the CPU: the prepared GPU script runs end to end at the tiny size, so it is
known to work before a GPU is ever used (there: bf16, klein 9B dims for stages c-f)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from bench.gpu_check import STAGES, stage_limit


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One run of every stage on the CPU (minutes), for the tests below: (the process, its OUT, its BENCHMARKS)."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    out, benchmarks = tmp_path / "gpu_check", tmp_path / "BENCHMARKS.md"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out),
                          "--benchmarks", str(benchmarks), "--repeats", "1"],
                         capture_output=True, text=True, timeout=900)
    print(run.stdout[-3000:], run.stderr[-3000:])
    return run, out, benchmarks


def test_gpu_check_runs_its_cpu_stages(cpu_check):
    run, out, benchmarks = cpu_check
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


def test_fp8_stage_cpu_rehearsal(cpu_check):
    """Stage f on the CPU (the same run): the tiny transformer step in bf16, then with its linears in FP8 on the
    fallback path (no FP8 matmul on a CPU), compared; the figures and the BENCHMARKS table it writes."""
    _, out, benchmarks = cpu_check
    print((out / "stage_f.log").read_text()[-3000:])
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


def test_stages_runs_only_the_stages_named(tmp_path):
    """--stages picks the stages to run: c alone on the CPU is reported skipped, and nothing else runs."""
    out = tmp_path / "gpu_check"
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--stages", "c",
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert json.loads((out / "gpu_check.json").read_text())["stages"] == {"c": {"skipped": "needs a GPU"}}
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json"]


def test_stage_time_boxes_fit_the_budget():
    """The stages' time boxes sum to the budget, whichever stages run (a box beyond the budget cut the last stage)."""
    for stages in ("abcfde", "abfde", "abcde", "ab", "e", "f"):
        boxes = [stage_limit(letter, 480, stages) for letter in stages]
        assert abs(sum(boxes) - 480) < 1e-6 and min(boxes) >= 30, (stages, boxes)
    assert "".join(STAGES) == "abcfde"  # f runs after the probe
    assert stage_limit("f", 480) == 60
