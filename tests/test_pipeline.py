"""The served pipeline in-process, without a server: pipeline.py driven by onnxruntime sessions of
the exported graphs (and the reference cache's own LRU) equals Flux2KleinKVPipeline; request
parsing and image decoding on their own, every bad input a client error."""

from __future__ import annotations

import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.interface import Limits
from flux2_serving.contract.specs import graph_specs
from flux2_serving.models.input_checks import BadInput, InputRules
from flux2_serving.models.local import local_pipeline
from flux2_serving.models.lru import ReferenceKVCache
from flux2_serving.models.pipeline import Interrupted, StageClock
from flux2_serving.models.request_inputs import InvalidInput, decode_image, load_rgb, parse, preprocess_reference
from flux2_serving.serving.triton_config import BLS_PARAMETERS, input_rules
from tests.support import CASES, assert_matches, png_bytes, random_image, raw_request, reference

LIMITS = Limits(**DEFAULT_ENVELOPE.request_limits())


@pytest.fixture(scope="module")
def served(ort_session, onnx_fp32, tiny_checkpoint):
    return local_pipeline(onnx_fp32, tiny_checkpoint, cache_entries=BLS_PARAMETERS["request_cache_entries"],
                          sessions=ort_session)


def _request(prompt, refs, seed, reuse=True, **kwargs):
    return parse(raw_request(prompt, refs, seed=seed, reuse_reference_cache=reuse, **kwargs), LIMITS)


@pytest.mark.parametrize("case", list(CASES))
def test_in_process_pipeline_equals_diffusers(pipe, served, case):
    pipeline, run = served
    refs = [random_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case]["refs"])]
    kwargs = CASES[case]["kwargs"]
    prompt, seed = f"a watercolor fox ({case})", 1234
    assert_matches(pipeline(_request(prompt, refs, seed, **kwargs)).images,
                   reference(pipe, prompt, refs, seed, **kwargs))


def test_in_process_cache_hit_equals_miss_and_skips_the_prefill(served):
    pipeline, run = served
    request = _request("a cache", [random_image(128, 160, seed=9)], 3, height=256, width=256)
    miss = pipeline(request).images
    run.calls.clear()
    hit = pipeline(request).images
    assert np.array_equal(hit, miss)
    assert "transformer_prefill" not in run.calls and "vae_encoder" not in run.calls


def test_in_process_repeat_of_the_same_bytes_is_not_decoded(served):

    pipeline, run = served
    refs = [random_image(160, 128, seed=21)]
    fresh = pipeline(_request("known bytes", refs, 4, height=256, width=256, reuse=False)).images
    pipeline(_request("known bytes", refs, 4, height=256, width=256))
    clock = StageClock()
    repeat = pipeline(_request("known bytes", refs, 4, height=256, width=256), clock).images
    assert "preprocess" not in clock.seconds and np.array_equal(repeat, fresh)
    run.cache = ReferenceKVCache(2**30)  # the K/V evicted behind the first-level key: decoded after all, same image
    clock = StageClock()
    assert np.array_equal(pipeline(_request("known bytes", refs, 4, height=256, width=256), clock).images, fresh)
    assert "preprocess" in clock.seconds


def rgba_reference(width, height, seed) -> Image.Image:
    """A random RGBA picture whose left half is transparent."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    pixels[:, : width // 2, 3] = 0
    pixels[:, width // 2:, 3] = 255
    return Image.fromarray(pixels, "RGBA")


LONG_PROMPT = " ".join(["a lighthouse on a cliff at dawn, waves, gulls, long exposure"] * 60)  # over 512 tokens


def test_in_process_seed_is_returned_and_a_random_one_reproduces(served):
    pipeline, _ = served
    sent = pipeline(_request("a seeded fox", [], 77, height=256, width=256))
    assert sent.seed == 77 and sent.notes == []
    inputs = {"prompt": np.array([b"a random fox"], dtype=np.object_), "height": np.array([256], dtype=np.int32),
              "width": np.array([256], dtype=np.int32), "num_inference_steps": np.array([1], dtype=np.int32)}
    drawn = pipeline(parse(inputs, LIMITS))
    again = pipeline(parse({**inputs, "seed": np.array([drawn.seed], dtype=np.int64)}, LIMITS))
    assert 0 <= drawn.seed < 2**63 and again.seed == drawn.seed
    assert np.array_equal(again.images, drawn.images)


def test_in_process_notes_are_the_same_when_the_references_are_known(served):
    """The prompt cut to the text length, an alpha channel dropped, a reference cropped: one note each,
    in request order, and the same notes when the references' bytes are known (not decoded again)
    and when their K/V was evicted (decoded again)."""
    pipeline, run = served
    refs = [rgba_reference(128, 96, seed=5), random_image(250, 200, seed=6)]
    expected = [
        "prompt: ",  # its token count depends on the tokenizer: checked below
        "image[0]: alpha channel dropped (RGBA converted to RGB, as diffusers does: transparent pixels show their "
        "stored color)",
        "image[1]: 250x200 cropped to 240x192 (sides multiples of 16)",
    ]
    fresh = pipeline(_request(LONG_PROMPT, refs, 8, height=256, width=256, reuse=False)).notes
    assert len(fresh) == 3 and fresh[1:] == expected[1:], fresh
    assert re.fullmatch(r"prompt: \d+ tokens \(chat template included\), only the first 512 were used; the rest "
                        r"was cut, as diffusers does", fresh[0]), fresh[0]
    pipeline(_request(LONG_PROMPT, refs, 8, height=256, width=256))  # stores the K/V; its bytes become known
    clock = StageClock()
    assert pipeline(_request(LONG_PROMPT, refs, 8, height=256, width=256), clock).notes == fresh
    assert "preprocess" not in clock.seconds  # not decoded: the notes were remembered
    run.cache = ReferenceKVCache(2**30)  # K/V evicted: decoded again for the prefill, still the same notes
    assert pipeline(_request(LONG_PROMPT, refs, 8, height=256, width=256)).notes == fresh
    assert pipeline(_request("a short prompt", [random_image(256, 256, seed=7)], 8)).notes == []


def test_notes_name_every_size_change_of_a_reference():

    processor, notes = Flux2ImageProcessor(vae_scale_factor=16), []
    for index, size in enumerate([(1500, 1100), (1100, 1100), (256, 192), (2048, 512)]):
        preprocess_reference(Image.new("RGB", size), processor, LIMITS, notes, index)
    assert notes == ["image[0]: 1500x1100 resized to 1195x876 (at most 1048576 pixels) and cropped to 1184x864 "
                     "(sides multiples of 16)",
                     "image[1]: 1100x1100 resized to 1024x1024 (at most 1048576 pixels)"]
    notes = []
    load_rgb(rgba_reference(64, 64, seed=1), 0, notes)
    load_rgb(Image.new("RGBA", (64, 64), (1, 2, 3, 255)), 1, notes)  # opaque: no pixel changes, no note
    palette = Image.new("P", (64, 64))
    palette.info["transparency"] = 0
    load_rgb(palette, 2, notes)
    assert [note.split(":")[0] for note in notes] == ["image[0]", "image[2]"], notes


def test_limits_are_checked_before_the_first_component_call(served):
    pipeline, run = served
    run.calls.clear()
    request = _request("too big", [random_image(64, 256, seed=1)], 1)  # default size from it: 64 wide
    with pytest.raises(InvalidInput, match="output width 64 .* outside"):
        pipeline(request)
    assert run.calls == []


def test_reference_tokens_are_checked_from_the_headers_before_any_pixel_is_decoded(served):
    """Four 4096x4096 black PNGs (49 KB each) hold 4 x 4096 tokens after preprocessing: refused with
    their pixels still not decoded (PIL's pending tiles still there) and no component called."""
    pipeline, run = served
    request = parse(raw_request("four big references", [_png(4096, 4096)] * 4), LIMITS)
    run.calls.clear()
    with pytest.raises(InvalidInput, match=r"'image': the references hold 16384 tokens after preprocessing "
                                           r"\(1024x1024, .*at most 4096 allowed"):
        pipeline(request)
    assert run.calls == []
    assert all(image.tile and image.size == (4096, 4096) for image in request.images)  # header read, not decoded


# ------------------------------------------------------------------ parsing, without a server


def _png(width, height, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width, height) -> bytes:
    """A PNG declaring width x height whose pixel data is a few bytes: what a decompression bomb shows
    before its zlib stream expands to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_pillows_decompression_bomb_guard_is_on():
    """Pillow refuses at open() an image declaring over 2 x MAX_IMAGE_PIXELS; nothing here turns that off
    (ours, max_input_pixels, is lower and checked right after)."""
    import flux2_serving.models.pipeline  # noqa: F401  (everything the BLS imports that could change it)

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS >= LIMITS.max_input_pixels


BAD = {
    "no prompt": ({}, "'prompt' is required"),
    "empty prompt": ({"prompt": np.array([b"  "], dtype=np.object_)}, "non-empty"),
    "not utf-8": ({"prompt": np.array([b"\xff\xfe"], dtype=np.object_)}, "not valid UTF-8"),
    "two prompts": ({"prompt": np.array([b"a", b"b"], dtype=np.object_)}, "exactly one value"),
    "too many references": ({"image": np.array([_png(64, 64)] * 5, dtype=np.object_)}, "at most 4 allowed"),
    "not an image": ({"image": np.array([b"GIF89a nope"], dtype=np.object_)}, "not a decodable"),
    "over our pixel limit": ({"image": np.array([_png_header(5000, 4000)], dtype=np.object_)},
                             r"'image\[0\]' declares 5000x4000 = 20000000 pixels, over the limit of 16777216"),
    "a decompression bomb": ({"image": np.array([_png_header(20000, 20000)], dtype=np.object_)},
                             r"'image\[0\]' declares more than 178956970 pixels; at most 16777216"),
    "height not multiple": ({"height": np.array([250], dtype=np.int32)}, "'height' is 250"),
    "width too large": ({"width": np.array([1456], dtype=np.int32)}, "'width' is 1456"),
    "negative seed": ({"seed": np.array([-1], dtype=np.int64)}, "'seed' is -1"),
    "images per prompt": ({"num_images_per_prompt": np.array([0], dtype=np.int32)}, "'num_images_per_prompt' is 0"),
    "steps": ({"num_inference_steps": np.array([51], dtype=np.int32)}, "'num_inference_steps' is 51"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_every_bad_input_is_a_client_error_naming_its_field(case):
    inputs, message = BAD[case]
    inputs = {"prompt": np.array([b"a cat"], dtype=np.object_), **inputs} if case != "no prompt" else inputs
    with pytest.raises(InvalidInput, match=message):
        parse(inputs, LIMITS)


def test_a_truncated_reference_fails_on_decoding_before_any_component_call(served):
    # parse reads headers only (a repeat of known bytes is never decoded); the pixels fail on decoding.
    pipeline, run = served
    truncated = _png(300, 300)[:80]
    request = parse({"prompt": np.array([b"a cat"], dtype=np.object_),
                     "image": np.array([truncated], dtype=np.object_)}, LIMITS)
    run.calls.clear()
    with pytest.raises(InvalidInput, match=r"'image\[0\]' could not be decoded"):
        pipeline(request)
    assert run.calls == []


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "1"])
def test_every_png_mode_decodes_to_rgb(mode):
    assert decode_image(_png(96, 80, mode), 0, LIMITS).mode == "RGB"


def test_a_stopped_request_makes_no_further_component_call(served):
    """should_stop() is asked before every component call: once it answers, the request ends before
    the next call (for a denoising loop: within one step), with the reason."""

    pipeline, run = served
    request = _request("a stopped fox", [random_image(96, 96, seed=4)], seed=3, reuse=False, height=256, width=256)
    asked = []

    def stop_after(n):
        def should_stop():
            asked.append(len(run.calls))
            return "cancelled" if len(asked) > n else None
        return should_stop

    for allowed in (0, 3, 5):
        run.calls.clear()
        asked.clear()
        with pytest.raises(Interrupted, match="cancelled") as stopped:
            pipeline(request, should_stop=stop_after(allowed))
        assert len(run.calls) == allowed  # not one call after the answer
        assert stopped.value.stage in ("text_encoder", "vae_encoder", "transformer_prefill", "transformer_cached")
    run.calls.clear()
    pipeline(request, should_stop=lambda: None)  # the same request, not stopped, runs to the end
    assert run.calls.count("transformer_cached") == 4


def test_limits_on_prompt_and_reference_bytes():
    with pytest.raises(InvalidInput, match="'prompt' is 16385 bytes; at most 16384"):
        parse({"prompt": np.array([b"a" * 16385], dtype=np.object_)}, LIMITS)
    parse({"prompt": np.array([b"a" * 16384], dtype=np.object_)}, LIMITS)  # at the limit: accepted
    huge = png_bytes(random_image(64, 64, seed=1)) + b"\0" * LIMITS.max_reference_bytes
    with pytest.raises(InvalidInput, match=r"'image\[0\]' is \d+ bytes; at most 67108864"):
        parse({"prompt": np.array([b"x"], dtype=np.object_), "image": np.array([huge], dtype=np.object_)}, LIMITS)


def test_component_input_checks_name_the_tensor_and_the_limit():
    dims = {"text_hidden": 32, "heads": 2, "head_dim": 16, "kv_layers": 2, "in_channels": 128}
    specs = graph_specs(dims)
    text = InputRules.from_json(input_rules(specs["text_encoder"], DEFAULT_ENVELOPE, vocab_size=100))
    ids = np.zeros((2, 512), np.int64)
    text.check({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    text.check({"input_ids": torch.from_numpy(ids), "attention_mask": torch.ones(2, 512, dtype=torch.int64)})
    for bad, message in ((100, "token id 100; ids must be in [0, 100)"), (-1, "token id -1")):
        ids[1, 7] = bad
        with pytest.raises(BadInput, match=re.escape(message)):
            text.check({"input_ids": ids, "attention_mask": np.ones_like(ids)})
    ids[1, 7] = 0
    with pytest.raises(BadInput, match="'attention_mask' must hold only 0 and 1"):
        text.check({"input_ids": ids, "attention_mask": np.full_like(ids, 2)})
    with pytest.raises(BadInput,
                       match=re.escape("'input_ids' has text_len = 513; the serving envelope allows [512, 512]")):
        text.check({"input_ids": np.zeros((1, 513), np.int64), "attention_mask": np.ones((1, 513), np.int64)})
    decoder = InputRules.from_json(input_rules(specs["vae_decoder"], DEFAULT_ENVELOPE))
    decoder.check({"latents": np.zeros((1, 16, 90, 128), np.float32)})
    with pytest.raises(BadInput, match=re.escape("lat_w = 91; the serving envelope allows [16, 90]")):
        decoder.check({"latents": np.zeros((1, 16, 91, 128), np.float32)})
    with pytest.raises(BadInput, match="expected"):
        decoder.check({"latents": np.zeros((1, 16, 16, 64), np.float32)})
    encoder = InputRules.from_json(input_rules(specs["vae_encoder"], DEFAULT_ENVELOPE))
    with pytest.raises(BadInput, match="a multiple of 16"):
        encoder.check({"image": np.zeros((1, 3, 64, 72), np.float32)})
    encoder.check({"image": np.zeros((1, 3, 2048, 512), np.float32)})  # 1024^2 pixels, 4:1: the widest reference
    with pytest.raises(BadInput, match=re.escape("'image' has height x width = 1024 x 1040 = 1064960; the serving "
                                                 "envelope allows at most 1048576")):
        encoder.check({"image": np.zeros((1, 3, 1024, 1040), np.float32)})  # within both sides' ranges
    cached = InputRules.from_json(input_rules(specs["transformer_cached"], DEFAULT_ENVELOPE))
    feed = {"latents": np.zeros((2, 16, 16, 128)), "prompt_embeds": np.zeros((2, 512, 96)), "timestep": np.zeros(2),
            "img_ids": np.zeros((16, 16, 4)), "txt_ids": np.zeros((512, 4)),
            "ref_kv_00": np.zeros((2, 0, 2, 16)), "ref_kv_01": np.zeros((2, 0, 2, 16))}
    cached.check(feed)  # text-to-image: no reference tokens
    with pytest.raises(BadInput, match="'timestep' has batch = 1 but 'latents' has 2"):
        cached.check({**feed, "timestep": np.zeros(1)})
    with pytest.raises(BadInput, match=re.escape("'ref_kv_01' has n_ref = 4 but 'ref_kv_00' has 0")):
        cached.check({**feed, "ref_kv_01": np.zeros((2, 4, 2, 16))})
    with pytest.raises(BadInput, match=re.escape("n_ref = 4097; the serving envelope allows [0, 4096]")):
        cached.check({**feed, "ref_kv_00": np.zeros((2, 4097, 2, 16)), "ref_kv_01": np.zeros((2, 4097, 2, 16))})
