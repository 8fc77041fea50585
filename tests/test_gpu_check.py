"""`make gpu-check` on the CPU: the prepared GPU script runs end to end at the tiny size, so it is
known to work before a GPU is ever used (there: bf16, klein 9B dims for stages c-e)."""

from __future__ import annotations

import json
import subprocess
import sys

from bench.gpu_check import STAGES, stage_limit


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


def test_stage_time_boxes_fit_the_budget():
    """The stages' time boxes sum to the budget, whichever stages run (a box beyond the budget cut the last stage)."""
    for stages in ("abcde", "abde", "ab", "e"):
        boxes = [stage_limit(letter, 480, stages) for letter in stages]
        assert abs(sum(boxes) - 480) < 1e-6 and min(boxes) >= 30, (stages, boxes)
    assert set(STAGES) == set("abcde")
