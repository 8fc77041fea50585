"""A newcomer's second hour: the seed of a random image comes back (and reproduces it), the server
says what it changed in a request, a client at the other protocol's port is told so in one line,
make serve and make demo take their ports, and the tools are quiet unless asked (--verbose)."""

from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpc
from PIL import Image

from flux2_serving.clients.api import (
    AsyncFlux2Client,
    Flux2Client,
    Generation,
    WrongProtocol,
    infer_inputs,
    request_tensors,
    requested_outputs,
)
from flux2_serving.server.launch import STOP_TIMEOUT_S, free_port, free_ports
from tests.support import ROOT, one_line_error, run_module

PROTOCOLS = ["grpc", "http"]
LONG_PROMPT = " ".join(["a lighthouse on a cliff at dawn, waves, gulls, long exposure"] * 60)  # over 512 tokens
SMALL = dict(height=256, width=256, num_inference_steps=1)


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def rgba_reference(width, height, seed) -> Image.Image:
    """A random RGBA picture whose left half is transparent."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[:, : width // 2, 3] = 0
    pixels[:, width // 2:, 3] = 255
    return Image.fromarray(pixels, "RGBA")


def rgb_reference(width, height, seed) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def generate(server, protocol, prompt="a plain cat", images=(), **options) -> Generation:
    with Flux2Client(server[protocol], protocol) as client:
        return client.generate(prompt, images, **{**SMALL, **options})


# ------------------------------------------------------------------ the seed


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_seed_sent_comes_back_and_a_plain_request_has_no_notes(triton_server, protocol):
    result = generate(triton_server, protocol, seed=123456)
    assert isinstance(result, list) and len(result) == 1 and isinstance(result[0], Image.Image)
    assert result.seed == 123456 and result.notes == []


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_random_seed_sent_back_reproduces_the_image_bit_exactly(triton_server, protocol):
    drawn = generate(triton_server, protocol, "a random lighthouse")
    assert isinstance(drawn.seed, int) and 0 <= drawn.seed < 2**63
    again = generate(triton_server, protocol, "a random lighthouse", seed=drawn.seed)
    assert again.seed == drawn.seed
    assert np.array_equal(np.asarray(again[0]), np.asarray(drawn[0]))


def test_the_async_client_returns_the_seed_and_names_the_wrong_port(triton_server):

    async def run(url, **options):
        async with AsyncFlux2Client(url) as client:
            return await client.generate("an async cat", **{**SMALL, **options})

    result = asyncio.run(run(triton_server["grpc"], seed=31))
    assert isinstance(result, Generation) and result.seed == 31 and result.notes == [] and len(result) == 1
    with pytest.raises(WrongProtocol, match="answers HTTP, not gRPC: use protocol='http'") as error:
        asyncio.run(run(triton_server["http"]))
    assert error.value.answers == "http" and error.value.url == triton_server["http"]


def test_outputs_are_answered_by_name(triton_server):
    """images and seed named: both come back, notes and png not."""
    client = grpc.InferenceServerClient(triton_server["grpc"])
    result = client.infer("flux2_klein_kv", infer_inputs(grpc, request_tensors("a cat", seed=9, **SMALL)),
                          outputs=requested_outputs(grpc, ("images", "seed")))
    assert result.as_numpy("images").shape == (1, 256, 256, 3)
    assert result.as_numpy("seed").tolist() == [9]
    assert result.as_numpy("notes") is None and result.as_numpy("png") is None


def test_the_readme_tritonclient_snippet_gets_the_clients_images_and_images_only(triton_server):
    """README, "Use it from your service": the plain-tritonclient snippet, run as written against the real
    server (its address swapped in), gets the project's client's images for the same request, and only
    the `images` output (no PNG encoded)."""
    section = (ROOT / "README.md").read_text().split("## Use it from your service")[1].split("### ")[0]
    (snippet,) = [block for block in re.findall(r"```python\n(.*?)```", section, re.S) if "tritonclient" in block]
    assert '"127.0.0.1:8001"' in snippet
    namespace = {}
    exec(snippet.replace('"127.0.0.1:8001"', repr(triton_server["grpc"])), namespace)  # the README's own code
    result = namespace["result"]
    assert result.as_numpy("png") is None and result.as_numpy("seed") is None  # asked for images only
    with Flux2Client(triton_server["grpc"]) as client:
        expected = client.generate("a red fox", height=512, width=512, seed=7, num_inference_steps=4)
    assert np.array_equal(namespace["images"], np.stack([np.asarray(image) for image in expected]))


# ------------------------------------------------------------------ the notes


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_what_the_server_changed_comes_back_as_notes(triton_server, protocol):
    """A long prompt, a transparent RGBA reference and one whose sides are not multiples of 16: one
    note each, in request order; the same notes on a repeat, whose reference bytes a BLS instance may
    already know (then they are not decoded again)."""
    references = [png(rgba_reference(128, 96, seed=1)), png(rgb_reference(250, 200, seed=2))]
    first = generate(triton_server, protocol, LONG_PROMPT, references, seed=3)
    assert len(first.notes) == 3, first.notes
    assert re.fullmatch(r"prompt: \d+ tokens \(chat template included\), only the first 512 were used; the rest "
                        r"was cut, as diffusers does", first.notes[0]), first.notes[0]
    assert first.notes[1].startswith("image[0]: alpha channel dropped (RGBA converted to RGB"), first.notes[1]
    assert first.notes[2] == "image[1]: 250x200 cropped to 240x192 (sides multiples of 16)"
    for _ in range(3):  # 4 BLS instances: some repeats land where the bytes are known
        repeat = generate(triton_server, protocol, LONG_PROMPT, references, seed=3)
        assert repeat.notes == first.notes
        assert np.array_equal(np.asarray(repeat[0]), np.asarray(first[0]))


# ------------------------------------------------------------------ the CLI


def cli(*args) -> subprocess.CompletedProcess:
    return run_module("flux2_serving.clients.cli", *args, timeout=120)


def test_cli_prints_the_seed_to_reproduce_and_the_notes(triton_server, tmp_path):
    (tmp_path / "ref.png").write_bytes(png(rgba_reference(256, 256, seed=4)))
    common = ("--url", triton_server["grpc"], "--prompt", "a fox", "--image", str(tmp_path / "ref.png"),
              "--num-inference-steps", "1")
    drawn = cli(*common, "--out", str(tmp_path / "drawn.png"))
    assert drawn.returncode == 0, drawn.stderr
    seed = int(re.search(r"^seed (\d+) \(pass --seed \1 to reproduce\)$", drawn.stdout, re.M).group(1))
    assert "note: image[0]: alpha channel dropped" in drawn.stdout
    again = cli(*common, "--seed", str(seed), "--out", str(tmp_path / "again.png"))
    assert again.returncode == 0, again.stderr
    assert f"seed {seed}\n" in again.stdout and "to reproduce" not in again.stdout
    pictures = [np.asarray(Image.open(tmp_path / name)) for name in ("drawn.png", "again.png")]
    assert np.array_equal(*pictures)


def test_cli_at_the_http_port_over_grpc_says_which_port_is_which(triton_server, tmp_path):
    url = triton_server["http"]
    one_line_error(cli("--protocol", "grpc", "--url", url, "--prompt", "x", "--out", str(tmp_path / "x.png")), 2,
              f"{url} answers HTTP, not gRPC", "--protocol http", "gRPC port (8001 by default)")


def test_cli_at_the_grpc_port_over_http_says_which_port_is_which(triton_server, tmp_path):
    url = triton_server["grpc"]
    one_line_error(cli("--protocol", "http", "--url", url, "--prompt", "x", "--out", str(tmp_path / "x.png")), 2,
              f"{url} answers gRPC, not HTTP", "--protocol grpc", "HTTP port (8000 by default)")


def test_cli_at_the_metrics_port_says_it_is_not_the_inference_endpoint(triton_server, tmp_path):
    url = triton_server["metrics"]
    one_line_error(cli("--url", url, "--prompt", "x", "--out", str(tmp_path / "x.png")), 2,
              "not Triton's inference endpoint", "gRPC port (8001 by default)")


# ------------------------------------------------------------------ ports of make serve and make demo


def test_make_serve_and_make_demo_take_their_ports(triton_server, tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "python $*"\n')  # records what make would run
    (fake / "python").chmod(0o755)
    ports = ["HTTP_PORT=18000", "GRPC_PORT=18001", "METRICS_PORT=18002"]
    flags = "--http-port 18000 --grpc-port 18001 --metrics-port 18002"
    serve = subprocess.run(["make", "-C", str(ROOT), "serve", f"REPO={triton_server['repository']}", f"BIN={fake}",
                            *ports], capture_output=True, text=True, timeout=120)
    assert serve.returncode == 0 and f"flux2_serving.server.launch --repository {triton_server['repository']} " \
        f"{flags}" in serve.stdout, serve.stdout + serve.stderr
    demo = subprocess.run(["make", "-n", "-C", str(ROOT), "demo", f"REPO={triton_server['repository']}", f"BIN={fake}",
                           *ports], capture_output=True, text=True, timeout=120)
    assert f"flux2_serving.clients.demo --repository {triton_server['repository']} --out build/demo {flags}" \
        in demo.stdout, demo.stdout + demo.stderr
    help_text = subprocess.run(["make", "-C", str(ROOT), "help"], capture_output=True, text=True).stdout
    assert all(name in help_text for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "VERBOSE=1"))


def _listening() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def test_a_port_in_use_is_one_line_before_anything_starts(tmp_path):
    repository = tmp_path / "repo"
    (repository / "flux2_klein_kv").mkdir(parents=True)
    (repository / "flux2_klein_kv" / "config.pbtxt").write_text("")  # never read: the ports are checked first
    with _listening() as taken:
        port = taken.getsockname()[1]
        others = ("--grpc-port", str(free_port()), "--metrics-port", str(free_port()))
        for module in ("flux2_serving.server.launch", "flux2_serving.clients.demo"):
            result = run_module(module, "--repository", str(repository), "--http-port", str(port), *others, timeout=60)
            one_line_error(result, 2, f"HTTP {port} already in use", "--http-port", "HTTP_PORT=")


# ------------------------------------------------------------------ quiet by default


def launch_until_ready(repository, *extra) -> tuple[str, int]:
    """Run the launcher until its ready line, stop it (Ctrl-C); everything it and tritonserver wrote
    to the terminal, and its exit status."""
    ports = free_ports()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "flux2_serving.server.launch", "--repository", str(repository),
         "--http-port", str(ports["http"]), "--grpc-port", str(ports["grpc"]), "--metrics-port", str(ports["metrics"]),
         *extra], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        seen = []
        for line in launcher.stdout:  # ends at the ready line, or when the launcher exits
            seen.append(line)
            if "tritonserver ready" in line:
                break
        os.killpg(launcher.pid, signal.SIGINT)
        rest, _ = launcher.communicate(timeout=STOP_TIMEOUT_S + 30)
        return "".join(seen) + rest, launcher.returncode
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()


def test_the_launcher_keeps_tritonserver_s_log_in_a_file_unless_verbose(small_repository, tmp_path):
    log = tmp_path / "server.log"
    quiet, status = launch_until_ready(small_repository, "--log-file", str(log))
    assert status == 0 and "tritonserver ready" in quiet, quiet
    assert f"its log: {log}" in quiet
    glog = re.compile(r"^[IWE]\d{4} ", re.M)  # tritonserver's own lines: I1201 17:35:30.714 ...
    assert not glog.search(quiet) and "NVML" not in quiet and "+----" not in quiet, quiet
    assert "successfully loaded 'flux2_klein_kv'" in log.read_text()
    verbose, status = launch_until_ready(small_repository, "--verbose")
    assert status == 0 and "successfully loaded 'flux2_klein_kv'" in verbose and glog.search(verbose), verbose


def test_export_is_quiet_unless_verbose(onnx_fp32):
    """No framework warning on stderr during an export that works (torch.onnx, onnxscript, transformers,
    diffusers all have something to say on this one): the session's fp32 export of all five graphs, run as a
    user runs it (tests/conftest.py keeps its stderr); --verbose is accepted."""
    stderr = (onnx_fp32 / "export.stderr").read_text()
    assert stderr.strip() == "", stderr[-3000:]
    assert (onnx_fp32 / "manifest.json").exists()
    assert "--verbose" in run_module("flux2_serving.export", "--help").stdout
