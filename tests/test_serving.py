"""End to end through a real tritonserver, over gRPC and HTTP, against diffusers'
Flux2KleinKVPipeline on the same tiny weights, inputs and seed."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from tritonclient.utils import InferenceServerException

from bench.overhead import stage_seconds
from flux2_serving.clients.api import infer_inputs, request_tensors, requested_outputs
from flux2_serving.devtools.metrics import bls_output_devices
from tests.support import CASES, assert_matches, png_bytes, random_image, reference

PROTOCOLS = ["grpc", "http"]


def _client(server, protocol):
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module, module.InferenceServerClient(server[protocol])


def infer(server, protocol, prompt="a cat", images=(), outputs=("images",), raw=None, **scalars):
    """Call flux2_klein_kv; `raw` maps extra input names to (array, triton dtype) as sent."""
    module, client = _client(server, protocol)
    tensors = {**request_tensors(prompt, images, **scalars), **(raw or {})}
    return client.infer("flux2_klein_kv", infer_inputs(module, tensors), outputs=requested_outputs(module, outputs))


def _served_equals_diffusers(pipe, server, protocol, case):
    refs = [random_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case]["refs"])]
    kwargs = CASES[case]["kwargs"]
    prompt, seed = f"a watercolor fox ({case})", 1234
    result = infer(server, protocol, prompt, [png_bytes(r) for r in refs], seed=seed, **kwargs)
    assert_matches(result.as_numpy("images"), reference(pipe, prompt, refs, seed, **kwargs))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(CASES))
def test_served_output_equals_diffusers(pipe, triton_server, protocol, case):
    _served_equals_diffusers(pipe, triton_server, protocol, case)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_flavor_output_equals_diffusers(pipe, torch_server, case):
    """--backend torch: the wrapper modules themselves in Python-backend models, same BLS and configs."""
    _served_equals_diffusers(pipe, torch_server, "grpc", case)
    config = (torch_server["repository"] / "transformer_cached" / "config.pbtxt").read_text()
    assert 'string_value: "torch"' in config


def test_every_component_output_arrives_on_the_bls_device(triton_server):
    """The BLS asks every model for outputs in its own memory and counts where they arrive (CPU here;
    cuda on a GPU server, where TensorRT would otherwise hand GPU tensors to a CPU BLS)."""
    before = bls_output_devices(triton_server["metrics"]).get("cpu", 0)
    infer(triton_server, "grpc", images=[png_bytes(random_image(128, 128, seed=5))], seed=2, height=256, width=256,
          num_inference_steps=2, reuse_reference_cache=False)
    devices = bls_output_devices(triton_server["metrics"])
    assert set(devices) == {"cpu"}, devices
    # text encoder 1 + VAE encoder 1 + prefill (4 blocks of K/V) + 2 steps + 1 decode = 9 tensors
    assert devices["cpu"] - before == 9


def test_png_output_only_when_requested(triton_server):
    both = infer(triton_server, "grpc", seed=1, height=256, width=256, outputs=("images", "png"))
    images, pngs = both.as_numpy("images"), both.as_numpy("png")
    assert len(pngs) == 1
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(pngs[0]))), images[0])
    only = infer(triton_server, "grpc", seed=1, height=256, width=256)
    assert only.as_numpy("png") is None


# ------------------------------------------------------------------ bad input: INVALID_ARG, server keeps serving


def _bomb() -> bytes:
    return png_bytes(Image.new("1", (5000, 5000)))  # 25 M pixels declared, a few KB encoded


BAD = {
    "missing_prompt": (dict(prompt=None), "missing required input(s) ['prompt']"),  # Triton core
    "empty_prompt": (dict(prompt="   "), "'prompt' must be a non-empty string"),
    "undecodable_image": (dict(images=[b"not an image at all"]), "'image[0]' is not a decodable"),
    "too_many_references": (dict(images=[b"x"] * 5), "at most 4 allowed"),
    "decompression_bomb": (dict(images=[_bomb()]), "over the limit of 16777216 pixels"),
    "truncated_image": (dict(images=[png_bytes(Image.new("RGB", (300, 300)))[:80]]), "'image[0]' could not be decoded"),
    "height_not_multiple_of_16": (dict(height=260, width=256), "'height' is 260; it must be a multiple of 16"),
    "width_outside_envelope": (dict(height=256, width=2048),
                               "'width' is 2048; it must be a multiple of 16 in [256, 1440]"),
    "steps_zero": (dict(num_inference_steps=0), "'num_inference_steps' is 0; it must be in [1, 50]"),
    "steps_too_many": (dict(num_inference_steps=51), "'num_inference_steps' is 51; it must be in [1, 50]"),
    "images_per_prompt": (dict(num_images_per_prompt=5), "'num_images_per_prompt' is 5; it must be in [1, 4]"),
    "wrong_dtype": (dict(raw={"height": (np.array([256], dtype=np.float32), "FP32")}), "height"),
    "wrong_shape": (dict(raw={"seed": (np.array([1, 2], dtype=np.int64), "INT64")}), "seed"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_invalid_arg_and_server_keeps_serving(triton_server, case):
    kwargs, message = BAD[case]
    protocol = "http" if case in ("empty_prompt", "wrong_dtype") else "grpc"
    with pytest.raises(InferenceServerException) as error:
        infer(triton_server, protocol, **{"prompt": "a cat", **kwargs})
    status = str(error.value.status())
    assert status in ("StatusCode.INVALID_ARGUMENT", "400"), (status, error.value.message())
    assert message in error.value.message()
    ok = infer(triton_server, "grpc", seed=3, height=256, width=256, num_inference_steps=1)
    assert ok.as_numpy("images").shape == (1, 256, 256, 3)


def test_bls_reports_its_stages_for_the_overhead_breakdown(triton_server):
    """flux2_bls_stage_seconds_total{stage}: what bench.overhead breaks the serving overhead down with."""
    before = stage_seconds(triton_server["metrics"])
    infer(triton_server, "grpc", images=[png_bytes(random_image(128, 128, seed=31))], seed=2, height=256, width=256,
          num_inference_steps=1, reuse_reference_cache=False, outputs=("images", "png"))
    grown = {stage for stage, value in stage_seconds(triton_server["metrics"]).items() if value > before.get(stage, 0)}
    assert {"parse", "preprocess", "postprocess", "png", "call:text_encoder", "call:vae_encoder",
            "call:transformer_prefill", "call:transformer_cached", "call:vae_decoder"} <= grown, grown
    assert "reference_key" not in grown and "call:reference_kv_cache" not in grown  # the request opted out
