"""What the BLS accepts must fit the engines: request limits derive from flux2_serving/contract/envelope.py, and the
accepted extremes, walked through the served preprocessing, land inside every TensorRT profile.
Also the memory plan: the old envelope does not fit an 80 GB GPU, the shipped one does."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE, ServingEnvelope, engine_profiles
from flux2_serving.contract.interface import Limits
from flux2_serving.contract.specs import GraphSpec, TensorSpec, graph_specs
from flux2_serving.models.request_inputs import (
    GenerationRequest,
    InvalidInput,
    decode_image,
    output_size,
    parse,
    preprocess_reference,
)
from flux2_serving.serving import memory_plan

DIMS_9B = {"text_hidden": 4096, "heads": 32, "head_dim": 128, "kv_layers": 32, "in_channels": 128}
LIMITS = Limits(**DEFAULT_ENVELOPE.request_limits())
PROCESSOR = Flux2ImageProcessor(vae_scale_factor=16)


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (120, 40, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _sizes(pixels) -> list[tuple[int, int]]:
    return [tuple(p.shape[-2:]) for p in pixels]


def _within(shape, profile) -> bool:
    lo, _, hi = profile
    return all(a <= s <= b for a, s, b in zip(lo, shape, hi, strict=True))


def _in_a_profile(shape, spec, tensor) -> bool:
    """`shape` lies within one of the TensorRT profiles of `spec` for input `tensor`."""
    return any(_within(shape, profile[tensor]) for profile in engine_profiles(spec))


# Extremes the validator accepts: smallest sides, widest aspect at and above the area cap, the
# declared-size cap, odd sizes that the crop rounds down.
ACCEPTED = [(64, 64), (64, 256), (256, 64), (2048, 512), (512, 2048), (4096, 1024), (4100, 1025),
            (1024, 1024), (1031, 1017), (2047, 513), (4096, 4096)]


@pytest.mark.parametrize("width, height", ACCEPTED)
def test_accepted_references_fit_the_vae_encoder_and_prefill_profiles(width, height):
    specs = graph_specs(DIMS_9B)
    image = decode_image(_png(width, height), 0, LIMITS)
    pixels = preprocess_reference(image, PROCESSOR, LIMITS)
    assert _in_a_profile(tuple(pixels.shape), specs["vae_encoder"], "image"), pixels.shape
    assert pixels.shape[-2] * pixels.shape[-1] <= DEFAULT_ENVELOPE.reference_max_area
    tokens = (pixels.shape[-2] // 16) * (pixels.shape[-1] // 16)
    ref_latents = (1, tokens, 128)
    assert _in_a_profile(ref_latents, specs["transformer_prefill"], "ref_latents")
    assert _in_a_profile((2, tokens, 32, 128), specs["transformer_cached"], "ref_kv_00")
    # The default output size is the reference's: inside the output profile, or rejected by name.
    try:
        out_h, out_w = output_size(GenerationRequest(prompt="x"), [tuple(pixels.shape[-2:])], LIMITS)
    except InvalidInput as exc:
        assert "pass 'height' explicitly" in str(exc) or "pass 'width' explicitly" in str(exc)
    else:
        assert _in_a_profile((2, out_h // 16, out_w // 16, 128), specs["transformer_cached"], "latents")


def test_vae_encoder_profiles_are_bounded_by_the_reference_area():
    """Two boxes (landscape, portrait) cover every size a reference can have after preprocessing (sides
    multiples of 16 in [64, 2048], area <= 1024^2) and neither holds more than twice that area; the
    square of the longest side (2048^2) would hold four times it."""
    envelope, spec = DEFAULT_ENVELOPE, graph_specs(DIMS_9B)["vae_encoder"]
    boxes = [profile["image"] for profile in engine_profiles(spec)]
    assert len(boxes) == 2
    for lo, opt, hi in boxes:
        assert hi[2] * hi[3] <= 2 * envelope.reference_max_area < envelope.reference_side[2] ** 2
        assert _within(opt, (lo, opt, hi)) and opt[2:] == (1024, 1024)
    sides = range(envelope.reference_side[0], envelope.reference_side[2] + 1, 16)
    for height in sides:
        for width in sides:
            if height * width <= envelope.reference_max_area:
                assert _in_a_profile((1, 3, height, width), spec, "image"), (height, width)
    # Every other graph keeps one profile.
    assert all(len(engine_profiles(s)) == 1 for s in graph_specs(DIMS_9B).values() if s.name != "vae_encoder")


@pytest.mark.parametrize("width, height, message", [
    (4100, 1024, "aspect ratio must be at most 4:1"),  # would exceed the 2048 px side of the profile
    (63, 256, "at least 64 px"),
])
def test_references_outside_the_profiles_are_rejected(width, height, message):
    with pytest.raises(InvalidInput, match=message):
        decode_image(_png(width, height), 0, LIMITS)


def test_reference_set_within_the_token_budget():
    four_small = [preprocess_reference(decode_image(_png(512, 512), i, LIMITS), PROCESSOR, LIMITS) for i in range(4)]
    # 4 x 1024 = 4096 tokens
    assert output_size(GenerationRequest(prompt="x"), _sizes(four_small), LIMITS) == (512, 512)
    two_large = [preprocess_reference(decode_image(_png(1024, 1024), i, LIMITS), PROCESSOR, LIMITS) for i in range(2)]
    with pytest.raises(InvalidInput, match="'image': the references hold 8192 tokens .* at most 4096 allowed"):
        output_size(GenerationRequest(prompt="x", height=512, width=512), _sizes(two_large), LIMITS)


@pytest.mark.parametrize("side", [256, 1440])
def test_accepted_output_sizes_fit_the_cached_step_and_decoder(side):
    specs = graph_specs(DIMS_9B)
    height, width = output_size(GenerationRequest(prompt="x", height=side, width=side), [], LIMITS)
    grid = (height // 16, width // 16)
    assert _in_a_profile((DEFAULT_ENVELOPE.engine_batch["transformer_cached"], *grid, 128),
                         specs["transformer_cached"], "latents")
    assert _in_a_profile((1, *grid, 128), specs["vae_decoder"], "latents")


def test_prompt_that_is_not_utf8_is_a_client_error():
    with pytest.raises(InvalidInput, match="'prompt' is not valid UTF-8"):
        parse({"prompt": np.array([b"\xff\xfe caf\xe9"], dtype=np.object_)}, LIMITS)


# ------------------------------------------------------------------ memory plan (klein 9B dims, bf16)


@pytest.fixture(scope="module")
def size_9b():
    return memory_plan.model_size(None)


def test_weights_are_the_9b_model(size_9b):
    assert size_9b.dims == DIMS_9B
    assert size_9b.params["transformer_cached"] == 9_078_581_248  # as built by the GPU probe
    # The prefill runs without the text stream and output layers (components.reference_stream_only):
    # ~1.9B parameters, 3.6 GiB of bf16 engine fewer.
    saved = size_9b.params["transformer_cached"] - size_9b.params["transformer_prefill"]
    assert 1.85e9 < saved < 2.0e9, saved
    assert 5.7e9 < size_9b.params["text_encoder"] < 5.9e9  # Qwen3-8B truncated after layer 27, no LM head


def _old_cached_spec(dims) -> GraphSpec:
    """The cached step before this layout: one stacked K/V tensor with a batch axis."""
    spec = graph_specs(dims)["transformer_cached"]
    kv = TensorSpec("ref_kv", ("batch", dims["kv_layers"], 2, "n_ref", dims["heads"], dims["head_dim"]))
    return GraphSpec(spec.name, spec.inputs[:5] + (kv,), spec.outputs)


def test_the_old_envelope_does_not_fit_80_gb(size_9b):
    old = ServingEnvelope(reference_tokens=(0, 4096, 16384), reference_cache_bytes=8 * 2**30, engine_batch={
        **DEFAULT_ENVELOPE.engine_batch, "transformer_cached": 4, "vae_decoder": 4})
    spec = _old_cached_spec(DIMS_9B)
    # [4, 32, 2, 16384, 32, 128]: 2^34 elements (32 GiB in bf16), far over TensorRT's 2^31-1
    assert memory_plan.max_tensor_elements(spec, old) == ("ref_kv", 2**34)
    assert memory_plan.io_bytes(spec, "bf16", old) > 32 * 2**30
    rows = memory_plan.plan(size_9b, "bf16", old, bls_instances=2)
    rows = [(what, who, memory_plan.io_bytes(spec, "bf16", old)
             if who == "transformer_cached" and what.startswith("I/O") else value) for what, who, value in rows]
    assert memory_plan.total_bytes(rows) > 80 * 2**30


def test_the_shipped_envelope_fits_80_gb_with_15_percent_headroom(size_9b):
    rows = memory_plan.plan(size_9b, "bf16", DEFAULT_ENVELOPE, bls_instances=memory_plan.GPU_BLS_INSTANCES)
    assert memory_plan.total_bytes(rows) <= 0.85 * 80 * 2**30
    # Each BLS instance holds a request's K/V twice while a step runs (and a CUDA context): a second one
    # costs that much more. (With the slim prefill two fit with 16% headroom; one stays the default
    # while the activation rows are estimates: envelope.GPU_BLS_INSTANCES.)
    two = memory_plan.plan(size_9b, "bf16", DEFAULT_ENVELOPE, bls_instances=2)
    pool = memory_plan.bls_transfer_bytes(size_9b.dims, "bf16", DEFAULT_ENVELOPE)
    context = int(memory_plan.CUDA_CONTEXT_GIB * 2**30)
    assert memory_plan.total_bytes(two) - memory_plan.total_bytes(rows) == pool + context
    graph, tensor, elements = memory_plan.largest_tensor(size_9b, DEFAULT_ENVELOPE)
    assert elements <= 2**31 - 1, (graph, tensor)


def test_serving_image_pool_is_the_plans(size_9b):
    """The serving image's default --cuda-memory-pool-byte-size is what the plan says the GPU's BLS instances hold."""
    dockerfile = (Path(__file__).resolve().parents[1] / "docker" / "serving.Dockerfile").read_text()
    pool = int(re.search(r"^ENV CUDA_POOL_BYTES=(\d+)$", dockerfile, flags=re.MULTILINE).group(1))
    per_instance = memory_plan.bls_transfer_bytes(size_9b.dims, "bf16", DEFAULT_ENVELOPE)
    assert pool == memory_plan.GPU_BLS_INSTANCES * per_instance


def test_memory_plan_cli_prints_the_table_and_todays_engines_fail_on_48_gb():
    run = [sys.executable, "-m", "flux2_serving.serving.memory_plan"]
    ok = subprocess.run([*run, "--dtype", "bf16", "--gpu-gib", "80"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "| **total** |" in ok.stdout and ": fits" in ok.stdout and "--cuda-memory-pool-byte-size" in ok.stdout
    assert "tier: 80gb-bf16" in ok.stdout
    small = subprocess.run([*run, "--tier", "80gb-bf16", "--gpu-gib", "48"], capture_output=True, text=True)
    assert small.returncode == 1 and "DOES NOT FIT" in small.stdout
    (shortfall,) = [line for line in small.stdout.splitlines() if line.startswith("shortfall:")]
    assert "the plan needs 64.46 GiB" in shortfall and "leaves 40.80" in shortfall
