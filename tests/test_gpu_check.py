"""`make gpu-check` on the CPU: the prepared GPU script runs end to end at the tiny size, so it is
known to work before a GPU is ever used (there: bf16, klein 9B dims for stages c-f)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from bench.gpu_check import BOX_S, DEFAULT_STAGES, ROOT, SETUP_S, STAGES, link_checkout, stage_limit

NO_GPU_RUN = "<!-- gpu_check:begin -->\nNo GPU run yet.\n<!-- gpu_check:end -->\n"


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    """One CPU rehearsal of every stage, the 9B export's too (not in the default run), at the tiny size (minutes),
    for the tests below: (the process, its OUT, its BENCHMARKS.md)."""
    tmp_path = tmp_path_factory.mktemp("gpu_check")
    out, benchmarks = tmp_path / "gpu_check", tmp_path / "BENCHMARKS.md"
    benchmarks.write_text(NO_GPU_RUN)
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--device", "cpu", "--out", str(out),
                          "--stages", "adbfce", "--benchmarks", str(benchmarks), "--repeats", "1"],
                         capture_output=True, text=True, timeout=1300)
    print(run.stdout[-3000:], run.stderr[-3000:])
    return run, out, benchmarks


def test_gpu_check_runs_its_cpu_stages(cpu_check):
    """Every stage runs at the tiny size; a CPU run reports in OUT/report.md and leaves BENCHMARKS.md's GPU
    section as it is."""
    run, out, benchmarks = cpu_check
    results = json.loads((out / "gpu_check.json").read_text())
    stages = results["stages"]
    assert list(stages) == list("adbfce")  # the headline (d) right after the environment
    assert stages["c"] == {"skipped": "needs a GPU"}
    env, served, e2e, export = stages["a"], stages["b"], stages["d"], stages["e"]
    assert stages["f"]["ok"] and stages["f"]["fp8"]["paths"] == {"fallback": 28}, stages["f"]
    assert env["ok"] and env["unresolved"] == {}  # tritonserver and this Python's stub resolve every library
    assert served["ok"], served
    assert set(served["cases"]) == {"text_to_image", "one_reference", "three_references", "two_images_per_prompt"}
    assert served["cache_hit_equals_miss"] and served["bls_output_devices"].keys() == {"cpu"}
    assert e2e["ok"] and [row["case"] for row in e2e["rows"]] == ["text_to_image", "one_reference"]
    for row in e2e["rows"]:  # same random weights served and in diffusers: the same image
        assert row["vs_served"]["ok"] and 0 < row["outside_components_s"] < row["served_s"]
        assert row["served_vs_kv"] > 0 and row["served_vs_no_kv"] > 0
    assert export["ok"] and export["trt_check_ok"], export
    assert run.returncode == 0
    assert benchmarks.read_text() == NO_GPU_RUN and "left as it is" in run.stdout
    report = (out / "report.md").read_text()
    assert "| d served | ok |" in report and "| e export | ok |" in report


def test_a_stage_whose_box_runs_out_keeps_its_partial_figures(tmp_path):
    """Stage d writes each figure the moment it has it: a box too short for the diffusers half still leaves the
    served latency in the report, marked as cut."""
    from bench.gpu_check import markdown

    partial = {"size": "9b", "dtype": "bf16", "side": 1024, "steps": 4, "repeats": 2, "ok": False, "partial": True,
               "error": "its 220 s box ran out (stopped after timing diffusers_kv_s on text_to_image)",
               "served_peak_memory_gib": 61.2,
               "rows": [{"case": "text_to_image", "refs": 0, "served_s": 1.21, "outside_components_s": 0.02,
                         "outside_share": 0.0165, "bls_stages_ms": {}, "diffusers_kv_s": 1.1, "served_vs_kv": 0.91},
                        {"case": "one_reference", "refs": 1, "served_s": 1.9, "outside_components_s": 0.03,
                         "outside_share": 0.0158, "bls_stages_ms": {}}]}
    text = markdown({"device": "cuda:0", "started": "now", "seconds": 470.0, "stages": {"d": partial}})
    assert "| d served | FAILED | its 220 s box ran out" in text
    assert "text_to_image 1.21 s (diffusers KV 1.10 s)" in text
    assert "| one_reference | 1.900 | 30 ms (2%) | - (not reached) |" in text
    assert "served 61.2 GiB, diffusers - (not reached) GiB" in text


def test_fp8_stage_cpu_rehearsal(cpu_check):
    """Stage f on the CPU (the same run): the tiny transformer step in bf16, then with its linears in FP8 on the
    fallback path (no FP8 matmul on a CPU), compared; the figures and the table of the report."""
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
    assert benchmarks.read_text() == NO_GPU_RUN  # a CPU run never writes BENCHMARKS.md's GPU section
    section = (out / "report.md").read_text()
    assert "| f fp8 | ok |" in section
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
    assert sorted(path.name for path in out.iterdir()) == ["gpu_check.json", "report.md"]


def test_the_plan_fits_the_budget_headline_first_and_the_boxes_share_it():
    """--plan: every box from its written estimate, the set-up included, within 480 s; the served 9B latency (d)
    right after the environment; the 9B export outside the default run. The boxes given share whatever budget
    is left, whichever stages run."""
    run = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plan"], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    lines = run.stdout.splitlines()
    assert lines[-2].startswith("total: set-up ") and lines[-2].endswith("<= 480 s: fits"), lines[-2]
    assert "not in this run: e export" in lines[-1]
    stage_lines = [line for line in lines if line[:2] in {f"{s} " for s in STAGES}]
    assert [line[0] for line in stage_lines] == list(DEFAULT_STAGES) and DEFAULT_STAGES[:2] == "ad"
    assert all(" = " in line and "-> box " in line for line in stage_lines)  # the arithmetic is printed
    assert SETUP_S + sum(BOX_S[s] for s in DEFAULT_STAGES) <= 480
    for stages in ("adbfc", "adbfce", "adbf", "ad", "e", "f"):
        boxes = [stage_limit(letter, 438, stages) for letter in stages]
        assert abs(sum(boxes) - 438) < 1e-6, (stages, boxes)
    too_long = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--plan", "--stages", "adbfce"],
                              capture_output=True, text=True, cwd=ROOT)
    assert too_long.returncode == 1 and "DOES NOT FIT" in too_long.stdout


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

