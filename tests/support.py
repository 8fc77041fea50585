"""What several test modules share (test modules do not import each other): numeric comparison,
graph runs, the served repository's settings, Triton's statistics, pictures and diffusers' reference
images for the end-to-end cases, and running a command-line tool."""

from __future__ import annotations

import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import tritonclient.grpc as grpc
from PIL import Image

from flux2_serving.clients.api import Flux2Client, Flux2Error, request_tensors
from flux2_serving.contract.security import INTERNAL_PARAMETER, admin_headers

ROOT = Path(__file__).resolve().parents[1]
# The served test repository: BLS instances (requests overlap on the CPU) and a reference cache budget
# small enough that the tests can fill it.
BLS_INSTANCES = 4
CACHE_BYTES = 2**20
# The internal secret of every server the tests start: conftest.py puts it in this process's environment,
# which flux2_serving.server.launch passes on (security.server_environment keeps it). Tests that call an
# internal model directly send INTERNAL as the BLS does.
INTERNAL_SECRET = "flux2-tests-internal-secret"
INTERNAL = {INTERNAL_PARAMETER: INTERNAL_SECRET}


def run_graph(session, **inputs) -> list[np.ndarray]:
    feeds = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    return session.run(None, feeds)


def rel_l2(actual, expected) -> float:
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))
    print(f"rel_l2={err:.2e}")
    return err


def model_counts(server, model: str) -> tuple[int, int]:
    headers = admin_headers(server["admin_key"], "grpc")  # statistics are an admin API
    stats = grpc.InferenceServerClient(server["grpc"]).get_inference_statistics(model, headers=headers).model_stats[0]
    return stats.inference_count, stats.execution_count


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def random_image(width, height, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def reference(pipe, prompt, images, seed, **kwargs) -> np.ndarray:
    out = pipe(prompt=prompt, image=list(images) or None, generator=torch.Generator("cpu").manual_seed(seed),
               output_type="np", **kwargs).images
    return (out * 255).round().astype(np.uint8)


def assert_matches(actual, expected):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = np.abs(actual.astype(np.int16) - expected.astype(np.int16))
    within_one = float((diff <= 1).mean())
    print(f"within 1 level: {within_one:.6f}, max diff {diff.max()}")
    assert within_one >= 0.999 and diff.max() <= 4


CASES = {
    "text_to_image": dict(refs=[], kwargs=dict(height=256, width=256)),
    "one_reference_default_size": dict(refs=[(320, 256)], kwargs={}),  # output size from the reference
    "three_references": dict(refs=[(96, 128), (200, 72), (160, 160)], kwargs=dict(height=256, width=288)),
    "two_images_per_prompt": dict(refs=[(128, 96)], kwargs=dict(height=256, width=256, num_images_per_prompt=2)),
}


def run_module(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=ROOT, **kwargs)


def one_line_error(result, status: int, *words):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def modules_imported_by(module: str, candidates) -> list[str]:
    """Which of `candidates` importing `module` loads, in a fresh interpreter (sorted)."""
    code = f"import sys, {module}; print(','.join(sorted(m for m in {tuple(candidates)!r} if m in sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return [name for name in result.stdout.strip().split(",") if name]


def wait_until_served(grpc_url: str, timeout: float = 120) -> None:
    """Until the BLS serves a small request again (after a test filled its queue): "overloaded" answers
    are retried, anything else raised."""
    deadline = time.monotonic() + timeout
    with Flux2Client(grpc_url, timeout_s=timeout) as client:
        while True:
            try:
                client.generate("idle?", height=256, width=256, seed=0, num_inference_steps=1)
                return
            except Flux2Error as exc:
                if "overloaded" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)


def raw_request(prompt: str, images=(), **options) -> dict:
    """One request's inputs as the BLS receives them (name -> array), built by the client's own
    request_tensors: images as PIL pictures, paths or bytes; options with diffusers' names."""
    return {name: array for name, (array, _) in request_tensors(prompt, images, **options).items()}
