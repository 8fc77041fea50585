"""`python -m bench.gpu_probe` at the tiny size on the CPU, as a GPU session runs it at 9B."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench import gpu_probe

ROOT = Path(__file__).resolve().parents[1]

EXPECTED = {
    "diffusers_plain_0ref": "diffusers plain step (text-to-image), 0 refs",
    "ours_cached_0ref": "ours: TransformerCached, 0 refs",
    "diffusers_extract_1ref": "diffusers extract step (step 0), 1 ref",
    "diffusers_cached_1ref": "diffusers cached step, 1 ref",
    "ours_prefill_1ref": "ours: TransformerPrefill, 1 ref",
    "ours_cached_1ref": "ours: TransformerCached, 1 ref",
    "diffusers_extract_4ref": "diffusers extract step (step 0), 4 refs",
    "diffusers_cached_4ref": "diffusers cached step, 4 refs",
    "ours_prefill_4ref": "ours: TransformerPrefill, 4 refs",
    "ours_cached_4ref": "ours: TransformerCached, 4 refs",
}


def test_gpu_probe_tiny_cpu(tmp_path):
    out_json, out_md = tmp_path / "probe.json", tmp_path / "probe.md"
    args = ["--size", "tiny", "--device", "cpu", "--repeats", "2", "--json", str(out_json), "--markdown", str(out_md)]
    # One thread: the tiny model gains nothing from more, and it keeps timings steady on a busy machine.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "bench.gpu_probe", *args], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "building Flux2Transformer2DModel (tiny, fp32" in result.stdout  # progress lines

    data = json.loads(out_json.read_text())
    assert data["device_type"] == "cpu" and data["size"] == "tiny" and data["repeats"] == 2
    assert data["weights"]["parameters"] > 0 and data["weights"]["bytes"] > 0
    measured = {m["name"]: m for m in data["measurements"]}
    assert set(measured) == set(EXPECTED)
    for _name, m in measured.items():
        assert "error" not in m, m
        assert m["median_ms"] > 0 and len(m["times_ms"]) == 2, m
        assert m["peak_gib"] > 0, m

    # Our cached step equals diffusers' cached step on the same inputs (fp32, CPU), for the
    # K/V from our prefill vs diffusers' extract, and with no reference (plain step).
    checks = data["checks"]
    assert set(checks["cached_max_abs_diff"]) == {"0", "1", "4"}
    for refs, diff in checks["cached_max_abs_diff"].items():
        assert diff < 1e-4, (refs, diff)
        assert checks["cached_max_abs_ref"][refs] > 0.1  # the compared outputs are not trivially zero
    assert set(checks["kv_max_abs_diff"]) == {"1", "4"}
    assert all(diff < 1e-4 for diff in checks["kv_max_abs_diff"].values()), checks

    md = out_md.read_text()
    assert md.startswith("## GPU probe")
    assert "python -m bench.gpu_probe " + " ".join(args) in md
    assert "| measurement | shape | median ms | peak memory GiB |" in md
    for label in EXPECTED.values():
        assert f"| {label} |" in md, label
    assert md in result.stdout  # the same section is printed


def test_gpu_probe_help_and_cpu_9b_refused():
    help_run = subprocess.run([sys.executable, "-m", "bench.gpu_probe", "--help"], cwd=ROOT,
                              capture_output=True, text=True)
    assert help_run.returncode == 0
    for word in ("extract", "cached", "TransformerPrefill", "TransformerCached", "peak memory", "--json",
                 "--markdown", "--repeats", "--size"):
        assert word in help_run.stdout, word
    refused = subprocess.run([sys.executable, "-m", "bench.gpu_probe", "--size", "9b", "--device", "cpu"],
                             cwd=ROOT, capture_output=True, text=True)
    assert refused.returncode == 2 and "--size tiny" in refused.stderr


def test_gpu_probe_runs_in_process():
    """make bench calls it as a function: measurements come back, no files written or re-read."""
    result = gpu_probe.run(size="tiny", device="cpu", refs="1", repeats=1, warmup=0)
    names = {m["name"] for m in result["measurements"]}
    assert names == {"diffusers_extract_1ref", "diffusers_cached_1ref", "ours_prefill_1ref", "ours_cached_1ref"}
    assert result["checks"]["kv_max_abs_diff"]["1"] < 1e-4
