"""Session fixtures: the tiny checkpoint and its fp32/bf16/FP8 exports are made once per run.

Export is slow on 2 cores (~2 min for the five fp32 graphs, most of it the text encoder's), and each export
is one busy Python process: so the exports the collected tests need start in the background before the
first test (`Exports`), as many at a time as there are cores, and each export fixture waits for its own.
Set FLUX2_TEST_CACHE=DIR to keep them between runs while developing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import Future, ThreadPoolExecutor
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


# The session's exports: fixture -> (folder, options of `python -m flux2_serving.export`), in the order they
# start (the fp32 one first: the first tests that need an export need it; then the longest).
EXPORTS = {
    "onnx_fp32": ("onnx_fp32", ("--dtype", "fp32")),
    # fp32 graphs with FP8 linear layers, calibrated on 3 prompts (0, 1 and 2 references: each kind the
    # calibration set has) at 64x64 and 2 steps: the CPU's budget; the real model's default is 128 prompts
    # at 1024^2 and 4 steps.
    "onnx_fp8": ("onnx_fp32_fp8", ("--dtype", "fp32", "--quantize", "fp8", "--calibration-size", "3",
                                   "--calibration-side", "64", "--calibration-steps", "2")),
    "onnx_bf16": ("onnx_bf16", ("--dtype", "bf16")),
}


class Exports:
    """Runs the exports through the user-facing CLI (so its progress lines and manifest are exercised), in
    the background, at most `slots` at a time; `result(fixture)` waits for one (starting it if nobody has)."""

    def __init__(self, tmp_path_factory, slots: int):
        self.tmp_path_factory = tmp_path_factory
        self.pool = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="export")
        self.futures: dict[str, Future] = {}
        self.processes: list[subprocess.Popen] = []
        self.lock = threading.Lock()
        self.closed = False

    def start(self, fixture: str, checkpoint: str) -> Future:
        with self.lock:
            if fixture not in self.futures:
                name, options = EXPORTS[fixture]
                out = _workdir(self.tmp_path_factory, name)
                self.futures[fixture] = self.pool.submit(self._export, checkpoint, out, options)
            return self.futures[fixture]

    def result(self, fixture: str, checkpoint: str) -> Path:
        out, stdout, stderr, status = self.start(fixture, checkpoint).result()
        assert status == 0, stdout[-3000:] + stderr[-3000:]
        return out

    def _export(self, checkpoint: str, out: Path, options) -> tuple[Path, str, str, int]:
        if (out / "manifest.json").exists() and (out / "export.stderr").exists():  # an earlier run's, in the cache
            return out, "", "", 0
        cmd = [sys.executable, "-m", "flux2_serving.export", "--model", checkpoint, "--onnx-dir", str(out),
               *options]
        with self.lock:
            if self.closed:
                return out, "", "the session ended before this export started", 1
            process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.processes.append(process)
        stdout, stderr = process.communicate()
        out.mkdir(parents=True, exist_ok=True)
        (out / "export.log").write_text(stdout + stderr)
        (out / "export.stderr").write_text(stderr)  # its warnings, if any: tests/test_second_hour.py
        return out, stdout, stderr, process.returncode

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for process in self.processes:
                if process.poll() is None:
                    process.kill()
        self.pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="session", autouse=True)
def exports(request, tmp_path_factory):
    """Starts, before the first test, every export that a collected test asks for by fixture (one asked for
    only through request.getfixturevalue starts when it is asked for)."""
    runner = Exports(tmp_path_factory, slots=os.cpu_count() or 1)
    try:
        wanted = [name for name in EXPORTS if any(name in item.fixturenames for item in request.session.items)]
        if wanted:
            checkpoint = request.getfixturevalue("tiny_checkpoint")
            for name in wanted:
                runner.start(name, checkpoint)
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="session")
def onnx_fp32(exports, tiny_checkpoint) -> Path:
    return exports.result("onnx_fp32", tiny_checkpoint)


@pytest.fixture(scope="session")
def onnx_bf16(exports, tiny_checkpoint) -> Path:
    return exports.result("onnx_bf16", tiny_checkpoint)


@pytest.fixture(scope="session")
def onnx_fp8(exports, tiny_checkpoint) -> Path:
    """fp32 graphs with FP8 linear layers (text encoder, prefill, cached step); EXPORTS says how calibrated."""
    return exports.result("onnx_fp8", tiny_checkpoint)


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
def small_repository(tmp_path_factory, onnx_fp32, tiny_checkpoint):
    """The same model in an onnxruntime repository with one BLS instance, for the tests that start a launcher
    or server of their own on it and send one request at a time: each BLS instance imports the serving stack
    when it loads, so a start takes ~13 s here against ~28 s with BLS_INSTANCES."""
    return assemble(onnx_fp32, tiny_checkpoint, tmp_path_factory.mktemp("small") / "model_repository",
                    backend="onnxruntime", bls_instances=1)


@pytest.fixture(scope="session")
def torch_server(tmp_path_factory, onnx_fp32, tiny_checkpoint):
    """The same repository in the torch flavor: every component runs its wrapper module in PyTorch."""
    repository, context = _serve(tmp_path_factory, onnx_fp32, tiny_checkpoint, "torch", bls_instances=1)
    with context as server:
        yield _as_dict(repository, server)
