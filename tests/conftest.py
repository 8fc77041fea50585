"""Session fixtures: the tiny checkpoint and its fp32/bf16 exports are made once per run.

Export is slow on 2 cores (~1.5 min for all five fp32 graphs), so every test shares them.
Set FLUX2_TEST_CACHE=DIR to keep them between runs while developing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.security import INTERNAL_SECRET_ENV
from flux2_serving.modeling.checkpoint import write_checkpoint
from flux2_serving.modeling.loading import load_pipeline
from flux2_serving.models.local import onnx_sessions
from flux2_serving.server.launch import running
from flux2_serving.serving.repository import assemble
from tests.support import BLS_INSTANCES, CACHE_BYTES, INTERNAL_SECRET


def pytest_configure(config):
    """SIGTERM (a CI timeout, a supervisor) ends the run like Ctrl-C: fixtures stop their servers.
    Each tritonserver runs in a process group of its own (flux2_serving.server.launch), so nothing else would.
    Every server started here gets one known internal secret, so tests can call internal models directly."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    os.environ[INTERNAL_SECRET_ENV] = INTERNAL_SECRET


def _workdir(tmp_path_factory, name: str) -> Path:
    cache = os.environ.get("FLUX2_TEST_CACHE")
    return Path(cache) / name if cache else tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    path = _workdir(tmp_path_factory, "tiny")
    if not (path / "model_index.json").exists():
        write_checkpoint(path, seed=0)
    return str(path)


def _export(tmp_path_factory, checkpoint: str, dtype: str, name: str | None = None, extra=()) -> Path:
    """Export through the user-facing CLI, so its progress lines and manifest are exercised."""
    out = _workdir(tmp_path_factory, name or f"onnx_{dtype}")
    if not (out / "manifest.json").exists():
        cmd = [sys.executable, "-m", "flux2_serving.export", "--model", checkpoint, "--onnx-dir", str(out),
               "--dtype", dtype, *extra]
        result = subprocess.run(cmd, capture_output=True, text=True)
        (out / "export.log").write_text(result.stdout + result.stderr)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def onnx_fp32(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "fp32")


@pytest.fixture(scope="session")
def onnx_bf16(tmp_path_factory, tiny_checkpoint) -> Path:
    return _export(tmp_path_factory, tiny_checkpoint, "bf16")


@pytest.fixture(scope="session")
def onnx_fp8(tmp_path_factory, tiny_checkpoint) -> Path:
    """fp32 graphs with FP8 linear layers (text encoder, prefill, cached step), calibrated on 6 prompts
    at 64x64 (the CPU's budget; the real model's default is 128 prompts at 1024^2)."""
    return _export(tmp_path_factory, tiny_checkpoint, "fp32", "onnx_fp32_fp8",
                   ("--quantize", "fp8", "--calibration-size", "6", "--calibration-side", "64"))


@pytest.fixture(scope="session")
def pipe(tiny_checkpoint):
    """The reference: diffusers' own Flux2KleinKVPipeline on the same weights."""
    return load_pipeline(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="session")
def ort_session(onnx_fp32):
    return onnx_sessions(onnx_fp32)


def _serve(tmp_path_factory, onnx_dir, checkpoint, backend: str, bls_instances: int = BLS_INSTANCES):
    """Assemble a repository of the tiny checkpoint for `backend`; a real tritonserver on it."""
    workdir = tmp_path_factory.mktemp(f"triton_{backend}")
    repository = assemble(onnx_dir, checkpoint, workdir / "model_repository", backend=backend,
                          bls_instances=bls_instances,
                          envelope=replace(DEFAULT_ENVELOPE, reference_cache_bytes=CACHE_BYTES))
    return repository, running(repository, log_file=workdir / "server.log")


def _as_dict(repository, server) -> dict:
    return {"http": server.http, "grpc": server.grpc, "metrics": server.metrics, "process": server.process,
            "log": server.log, "repository": repository, "admin_key": server.admin_key, "gate": server.gate}


@pytest.fixture(scope="session")
def triton_server(tmp_path_factory, onnx_fp32, tiny_checkpoint):
    """A real tritonserver on the assembled (onnxruntime) repository of the tiny checkpoint.

    4 BLS instances so concurrent requests overlap; the shared 1 MiB reference K/V cache holds
    two 256x256 tiny-model entries (2 KiB per reference token), so eviction happens in the tests."""
    repository, context = _serve(tmp_path_factory, onnx_fp32, tiny_checkpoint, "onnxruntime")
    with context as server:
        yield _as_dict(repository, server)


@pytest.fixture(scope="session")
def torch_server(tmp_path_factory, onnx_fp32, tiny_checkpoint):
    """The same repository in the torch flavor: every component runs its wrapper module in PyTorch."""
    repository, context = _serve(tmp_path_factory, onnx_fp32, tiny_checkpoint, "torch", bls_instances=1)
    with context as server:
        yield _as_dict(repository, server)
