"""The CLI and the Python API against a real tritonserver (tiny model)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as http
from PIL import Image

from flux2_serving.clients.api import (
    AsyncFlux2Client,
    Flux2Client,
    Flux2Error,
    InvalidRequest,
    infer_inputs,
    request_tensors,
)
from flux2_serving.devtools.pictures import synthetic_reference
from flux2_serving.server.launch import free_port

ROOT = Path(__file__).resolve().parents[1]


def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux2_serving.clients.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_writes_pngs_equal_to_the_api(triton_server, tmp_path, protocol):
    reference = tmp_path / "ref.png"
    reference.write_bytes(synthetic_reference((256, 320), 90))
    run = cli("--protocol", protocol, "--url", triton_server[protocol], "--prompt", "a fox in snow",
              "--image", str(reference), "--seed", "5", "--num-images-per-prompt", "2", "--num-inference-steps", "2",
              "--out", str(tmp_path / "fox.png"))
    assert run.returncode == 0, run.stderr
    assert "latency" in run.stdout
    written = [np.asarray(Image.open(tmp_path / f"fox_{i}.png")) for i in range(2)]
    assert written[0].shape == (320, 256, 3)  # output size taken from the reference
    with Flux2Client(triton_server["grpc"]) as client:
        expected = client.generate("a fox in snow", [reference], seed=5, num_images_per_prompt=2, num_inference_steps=2)
    for png, image in zip(written, expected, strict=True):
        assert np.array_equal(png, np.asarray(image))


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cli_bad_request_exits_nonzero_naming_the_field(triton_server, tmp_path, protocol):
    run = cli("--protocol", protocol, "--url", triton_server[protocol], "--prompt", "x", "--height", "260",
              "--width", "256", "--out", str(tmp_path / "never.png"))
    assert run.returncode == 1
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "'height' is 260" in lines[0], run.stderr
    assert not (tmp_path / "never.png").exists()


def test_cli_unreachable_server_is_one_line(tmp_path):
    for protocol in ("grpc", "http"):
        run = cli("--protocol", protocol, "--url", f"127.0.0.1:{free_port()}", "--prompt", "x",
                  "--out", str(tmp_path / "never.png"))
        assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr


def test_a_prompt_that_is_not_unicode_is_refused_before_it_is_sent():
    """A lone surrogate (a JSON "\\ud800" escape, an undecodable command-line byte) has no UTF-8 bytes:
    InvalidRequest naming 'prompt' (a Flux2Error, so callers catching those keep working), nothing sent."""
    with pytest.raises(InvalidRequest, match=r"'prompt' is not valid Unicode text: character 2 is a lone surrogate"):
        request_tensors("a \ud800 fox")
    for protocol in ("grpc", "http"):
        with Flux2Client(f"127.0.0.1:{free_port()}", protocol) as client, pytest.raises(Flux2Error) as refused:
            client.generate("\udcff")  # nobody listens there: refused before any connection
        assert isinstance(refused.value, InvalidRequest) and "'prompt'" in str(refused.value)
    run = cli("--url", f"127.0.0.1:{free_port()}", "--prompt", "\udcff", "--out", "never.png")  # argv byte 0xff
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "'prompt' is not valid Unicode text" in run.stderr and "is tritonserver running" not in run.stderr


def test_cli_help_lists_every_option():
    run = cli("--help")
    for option in ("--prompt", "--image", "--height", "--width", "--seed", "--num-images-per-prompt",
                   "--num-inference-steps", "--url", "--out", "--protocol"):
        assert option in run.stdout


def test_api_error_carries_status(triton_server):
    with Flux2Client(triton_server["http"], "http") as client, pytest.raises(Flux2Error) as error:
        client.generate("x", num_images_per_prompt=9, height=256, width=256)
    assert error.value.status == "400" and "'num_images_per_prompt' is 9" in str(error.value)


def test_http_inputs_travel_as_binary():
    inputs = infer_inputs(http, request_tensors("a cat", [synthetic_reference((64, 64), 1)], height=256, seed=3))
    for tensor in inputs:
        assert tensor._get_binary_data() is not None, tensor.name()
        assert "data" not in tensor._get_tensor(), tensor.name()  # no JSON array


def test_async_client_concurrent_requests_match_sequential(triton_server):
    seeds = [11, 12, 13]

    async def run_all():
        async with AsyncFlux2Client(triton_server["grpc"]) as client:
            return await asyncio.gather(*(client.generate("a boat", height=256, width=256, seed=seed,
                                                          num_inference_steps=1) for seed in seeds))

    concurrent = asyncio.run(run_all())
    with Flux2Client(triton_server["grpc"]) as client:
        for seed, (image,) in zip(seeds, concurrent, strict=True):
            (alone,) = client.generate("a boat", height=256, width=256, seed=seed, num_inference_steps=1)
            assert np.array_equal(np.asarray(image), np.asarray(alone))
    assert not np.array_equal(np.asarray(concurrent[0][0]), np.asarray(concurrent[1][0]))
