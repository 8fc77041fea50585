"""perf_analyzer: provisioning, its --input-data files, and one short measurement through `python -m perf.run`
against the real tritonserver of the session."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from perf import input_data
from perf.provision import provision
from perf.run import parse

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def perf_analyzer(tmp_path_factory) -> Path:
    """Provisioned once per run (or kept in FLUX2_TEST_CACHE between runs)."""
    cache = os.environ.get("FLUX2_TEST_CACHE")
    directory = Path(cache) / "perf_analyzer" if cache else tmp_path_factory.mktemp("perf_analyzer")
    lines = []
    wrapper = provision(directory, log=lines.append)
    assert lines and ("ready" in lines[-1] or "already provisioned" in lines[-1]), lines
    again = []
    assert provision(directory, log=again.append) == wrapper
    assert "already provisioned" in again[-1], again  # idempotent: a working one is kept
    return wrapper


def _decode_bytes_tensor(tensor: dict) -> list[bytes]:
    raw = base64.b64decode(tensor["content"]["b64"])
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        items.append(raw[offset + 4:offset + 4 + length])
        offset += 4 + length
    assert len(items) == tensor["shape"][0]
    return items


def test_input_data_files(tmp_path):
    paths = input_data.write_all(tmp_path, height=256, width=320, ref_size=128, num_inference_steps=2)
    assert set(paths) == {"text_to_image", "reference_1", "reference_3"}
    for case, references in input_data.CASES.items():
        (entry,) = json.loads(paths[case].read_text())["data"]
        assert isinstance(entry["prompt"][0], str) and entry["prompt"][0]
        assert entry["height"] == [256] and entry["width"] == [320] and entry["num_inference_steps"] == [2]
        if not references:
            assert "image" not in entry  # optional input left out
            continue
        pictures = _decode_bytes_tensor(entry["image"])
        assert len(pictures) == references
        for png in pictures:
            assert Image.open(io.BytesIO(png)).size == (128, 128)
        assert len(set(pictures)) == references  # distinct references


def test_perf_analyzer_measures_text_to_image_over_grpc(triton_server, perf_analyzer, tmp_path):
    out = tmp_path / "perf"
    cmd = [sys.executable, "-m", "perf.run", "--grpc-url", triton_server["grpc"], "--protocols", "grpc",
           "--cases", "text_to_image", "--concurrency", "1", "--measurement-request-count", "2",
           "--num-inference-steps", "1", "--perf-analyzer", str(perf_analyzer), "--out", str(out), "--timeout", "120"]
    # The server as make serve starts it (the gate, statistics open): no admin key anywhere.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX2_ADMIN_KEY")}
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    log = (out / "text_to_image_grpc.log").read_text() if (out / "text_to_image_grpc.log").exists() else ""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log[-3000:]
    assert "perf_analyzer: text_to_image over grpc" in result.stdout

    (row,) = parse(out / "text_to_image_grpc.csv", log=log)
    assert row.concurrency == 1
    assert row.throughput > 0 and row.p50_ms > 0 and row.p99_ms >= row.p50_ms
    assert row.requests and row.requests >= 2
    # The BLS called the text encoder, the cached transformer (once per step) and the decoder;
    # text-to-image needs neither the VAE encoder nor the prefill.
    for model in ("text_encoder", "transformer_cached", "vae_decoder"):
        assert row.composing[model].calls_per_request > 0, (model, row.composing)
        assert row.composing[model].compute_ms > 0
    for model in ("vae_encoder", "transformer_prefill"):
        assert model not in row.composing or row.composing[model].calls_per_request == 0

    report = (out / "results.md").read_text()
    assert "| text_to_image | grpc | 1 |" in report and "failed" not in report
    # The exact command line, in the log and in the results, ready to run by hand.
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("  command: ")]
    assert f"-u {triton_server['grpc']} -i grpc" in line and "--bls-composing-models=" in line
    assert line.removeprefix("  command: ") in report


def test_input_data_can_bypass_the_reference_cache():
    assert "reuse_reference_cache" not in input_data.request("reference_1", ref_size=64)
    bypassed = input_data.request("reference_1", ref_size=64, reuse_reference_cache=False)
    assert bypassed["reuse_reference_cache"] == [False]
    assert "reuse_reference_cache" not in input_data.request("text_to_image", reuse_reference_cache=False)
