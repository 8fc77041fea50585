"""bench.front without its load (issue 22): the command answers --help, AIPerf's results file is read
as AIPerf 0.13.0 writes it (tests/data/aiperf_profile_export.json: the summary keys of a real run
through the front, its per-metric percentiles trimmed to what the benchmark reads), and the tables
come out of fixed numbers as BENCHMARKS.md shows them. Nothing here starts a server or a load tool."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.front import (
    AIPERF,
    DIRECT_PATH,
    FRONT_PATH,
    PERF_ANALYZER,
    THREADS_DIRECT,
    THREADS_FRONT,
    LoadRow,
    aiperf_command,
    load_table,
    markdown,
    overhead_summary,
    overhead_table,
    parse_aiperf,
    percentile,
)

ROOT = Path(__file__).resolve().parents[1]
EXPORT = ROOT / "tests" / "data" / "aiperf_profile_export.json"


def test_help_exits_0():
    result = subprocess.run([sys.executable, "-m", "bench.front", "--help"], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for option in ("--requests", "--concurrency", "--repeats", "--load-tool", "--no-write", "--onnx-dir"):
        assert option in result.stdout


def test_parse_aiperf_reads_a_real_export():
    raw = json.loads(EXPORT.read_text())
    parsed = parse_aiperf(EXPORT)
    assert parsed["version"] == raw["aiperf_version"] == "0.13.0"
    assert parsed["throughput"] == pytest.approx(raw["request_throughput"]["avg"])
    assert parsed["p50_ms"] == pytest.approx(raw["request_latency"]["p50"])
    assert parsed["p99_ms"] == pytest.approx(raw["request_latency"]["p99"])
    assert parsed["requests"] == raw["request_latency"]["count"] and parsed["errors"] == 0
    assert 0 < parsed["p50_ms"] <= parsed["p99_ms"]
    # throughput: the requests over the run's duration (AIPerf times its window a little apart from it)
    assert parsed["throughput"] == pytest.approx(parsed["requests"] / parsed["duration_s"], rel=0.02)
    assert raw["input_config"]["endpoint"]["type"] == "image_generation"


def test_parse_aiperf_counts_failures_and_refuses_other_units(tmp_path):
    raw = json.loads(EXPORT.read_text())
    raw["request_count"]["avg"], raw["completed_request_count"]["avg"] = 5.0, 6.0
    path = tmp_path / "export.json"
    path.write_text(json.dumps(raw))
    assert parse_aiperf(path)["errors"] == 1
    raw["request_latency"]["unit"] = "sec"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="not ms"):
        parse_aiperf(path)


def test_aiperf_command_sends_the_workload(tmp_path):
    command = aiperf_command(Path("aiperf"), "http://127.0.0.1:9000", "flux2-model", "tok", tmp_path / "p.jsonl", 2,
                             6, tmp_path / "art")
    text = " ".join(command)
    assert command[:2] == ["aiperf", "profile"]
    for part in ("--endpoint-type image_generation", "--concurrency 2", "--request-count 6", "--model flux2-model",
                 "--extra-inputs size:1024x1024", "--extra-inputs seed:1", "--extra-inputs num_inference_steps:4",
                 "--extra-inputs output_format:png", "--extra-inputs response_format:b64_json", "--tokenizer tok",
                 "--custom-dataset-type single_turn", "--warmup-request-count 1"):
        assert part in text, part


def test_load_table_from_fixed_numbers():
    rows = [LoadRow(PERF_ANALYZER, DIRECT_PATH, 1, 6, 0.25, 4000, 4400, tool_cpu_s=0.2),
            LoadRow(AIPERF, FRONT_PATH, 1, 6, 0.2, 4100, 4840, tool_cpu_s=30.0),
            LoadRow(THREADS_DIRECT, DIRECT_PATH, 1, 6, 0.25, 4000, 4400, tool_cpu_s=1.0),
            LoadRow(THREADS_FRONT, FRONT_PATH, 1, 6, 0.245, 4040, 4400, tool_cpu_s=1.5),
            LoadRow(AIPERF, FRONT_PATH, 2, 5, 0.3, 6000, 7000, errors=1)]
    assert load_table(rows).splitlines() == [
        "| tool | path | concurrency | requests | throughput (req/s) | p50 latency (ms) | p99 latency (ms) | "
        "load tool CPU (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        f"| AIPerf | {FRONT_PATH} | 1 | 6 | 0.200 | 4100 | 4840 | 30.0 |",
        f"| {THREADS_FRONT} | {FRONT_PATH} | 1 | 6 | 0.245 | 4040 | 4400 | 1.5 |",
        f"| {THREADS_DIRECT} | {DIRECT_PATH} | 1 | 6 | 0.250 | 4000 | 4400 | 1.0 |",
        f"| perf_analyzer | {DIRECT_PATH} | 1 | 6 | 0.250 | 4000 | 4400 | 0.2 |",
        f"| AIPerf | {FRONT_PATH} | 2 | 5 (1 failed) | 0.300 | 6000 | 7000 |  |",
        "| front / direct: AIPerf / perf_analyzer | | 1 | | 0.80x | 1.02x | 1.10x | |",
        "| front / direct: same client, threads | | 1 | | 0.98x | 1.01x | 1.00x | |",
    ]


def test_overhead_from_fixed_numbers():
    measured = {"direct_s": [4.0, 4.2, 4.1, 4.3], "front_s": [4.05, 4.25, 4.2, 4.4], "same_png": True,
                "front_request_s": 4.18, "front_triton_s": 4.16}
    summary = overhead_summary(measured)
    assert summary["direct_p50"] == pytest.approx(4150) and summary["front_p50"] == pytest.approx(4225)
    assert summary["overhead_p50"] == pytest.approx(75) and summary["ratio_p50"] == pytest.approx(4225 / 4150)
    assert summary["own_ms"] == pytest.approx(20) and summary["outside_ms"] == pytest.approx(4225 - 4180)
    lines = overhead_table(summary).splitlines()
    assert lines[2] == f"| {DIRECT_PATH}, `Flux2Client` | 4 | 4150 | 4270 |"
    assert lines[3] == f"| {FRONT_PATH}, official `openai` client | 4 | 4225 | 4355 |"
    assert lines[4] == "| front - direct | | **+75** (1.018x) | +85 |"


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)
    assert percentile([5], 99) == 5


def test_markdown_states_the_overhead_and_both_ratios():
    summary = overhead_summary({"direct_s": [4.0, 4.2], "front_s": [4.1, 4.3], "same_png": True,
                                "front_request_s": 4.15, "front_triton_s": 4.1})
    rows = [LoadRow(AIPERF, FRONT_PATH, 1, 6, 0.2, 4100, 4840, tool_cpu_s=12.0),
            LoadRow(PERF_ANALYZER, DIRECT_PATH, 1, 6, 0.25, 4000, 4400, tool_cpu_s=0.2),
            LoadRow(THREADS_FRONT, FRONT_PATH, 1, 6, 0.245, 4040, 4400, tool_cpu_s=1.5),
            LoadRow(THREADS_DIRECT, DIRECT_PATH, 1, 6, 0.25, 4000, 4400, tool_cpu_s=1.0)]
    args = argparse.Namespace(command="python -m bench.front", repeats=2, concurrency="1", requests=6)
    text = markdown(args, summary, rows, ["a note"], 120.0)
    assert text.startswith("## OpenAI Images front: overhead and load (`make bench`: `python -m bench.front`)")
    assert "**Front overhead per request at 1024x1024: 100 ms**" in text  # 4.2 s mean e2e - 4.1 s Triton call
    assert "0.80x at concurrency 1" in text and "0.98x at concurrency 1" in text
    assert "- a note" in text and "byte for byte" in text
