"""The served pipeline in-process, without a server: pipeline.py driven by onnxruntime sessions of
the exported graphs (and the reference cache's own LRU) equals Flux2KleinKVPipeline; request
parsing and image decoding on their own, every bad input a client error."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SOURCES = Path(__file__).resolve().parents[1] / "model_repository"
sys.path[:0] = [str(SOURCES / "flux2_klein_kv" / "1"), str(SOURCES / "reference_kv_cache" / "1")]
from lru import ReferenceKVCache  # noqa: E402
from pipeline import ServedPipeline  # noqa: E402
from request_inputs import InvalidInput, Limits, decode_image, parse  # noqa: E402

from export.envelope import DEFAULT_ENVELOPE  # noqa: E402
from tests.test_serving import CASES, assert_matches, png_bytes, random_image, reference  # noqa: E402

LIMITS = Limits(**DEFAULT_ENVELOPE.request_limits())


class OnnxRuntimeRun:
    """`run` for the pipeline: each component's exported graph in onnxruntime, the cache as an LRU."""

    def __init__(self, ort_session):
        self.session, self.cache, self.calls = ort_session, ReferenceKVCache(2**30), []

    def __call__(self, model: str, inputs: dict, outputs: list[str]) -> list:
        self.calls.append(model)
        if model == "reference_kv_cache":
            key = inputs["key"][0].decode()
            if "ref_kv_00" in inputs:
                self.cache.put(key, [v for k, v in inputs.items() if k.startswith("ref_kv_")])
                return [np.array([False])]
            found = self.cache.get(key)
            return [np.array([found is not None])] + (found if found is not None else [None] * (len(outputs) - 1))
        feeds = {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        results = self.session(model).run(outputs, feeds)
        return [torch.from_numpy(result) for result in results]


@pytest.fixture(scope="module")
def served(ort_session, onnx_fp32, tiny_checkpoint):
    import json

    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer

    run = OnnxRuntimeRun(ort_session)
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    pipeline = ServedPipeline(run, AutoTokenizer.from_pretrained(tiny_checkpoint, subfolder="tokenizer"),
                              FlowMatchEulerDiscreteScheduler.load_config(tiny_checkpoint, subfolder="scheduler"),
                              manifest["dims"], torch.float32, LIMITS, torch.device("cpu"), 512, "in-process")
    return pipeline, run


def _request(prompt, refs, seed, reuse=True, **kwargs):
    scalars = {"height": np.int32, "width": np.int32, "num_images_per_prompt": np.int32}
    inputs = {"prompt": np.array([prompt.encode()], dtype=np.object_), "seed": np.array([seed], dtype=np.int64),
              "reuse_reference_cache": np.array([reuse])}
    if refs:
        inputs["image"] = np.array([png_bytes(r) for r in refs], dtype=np.object_)
    inputs.update({k: np.array([v], dtype=scalars[k]) for k, v in kwargs.items()})
    return parse(inputs, LIMITS)


@pytest.mark.parametrize("case", list(CASES))
def test_in_process_pipeline_equals_diffusers(pipe, served, case):
    pipeline, run = served
    refs = [random_image(w, h, seed=i) for i, (w, h) in enumerate(CASES[case]["refs"])]
    kwargs = CASES[case]["kwargs"]
    prompt, seed = f"a watercolor fox ({case})", 1234
    assert_matches(pipeline(_request(prompt, refs, seed, **kwargs)), reference(pipe, prompt, refs, seed, **kwargs))


def test_in_process_cache_hit_equals_miss_and_skips_the_prefill(served):
    pipeline, run = served
    request = _request("a cache", [random_image(128, 160, seed=9)], 3, height=256, width=256)
    miss = pipeline(request)
    run.calls.clear()
    hit = pipeline(request)
    assert np.array_equal(hit, miss)
    assert "transformer_prefill" not in run.calls and "vae_encoder" not in run.calls


def test_in_process_repeat_of_the_same_bytes_is_not_decoded(served):
    from pipeline import StageClock

    pipeline, run = served
    refs = [random_image(160, 128, seed=21)]
    fresh = pipeline(_request("known bytes", refs, 4, height=256, width=256, reuse=False))
    pipeline(_request("known bytes", refs, 4, height=256, width=256))
    clock = StageClock()
    repeat = pipeline(_request("known bytes", refs, 4, height=256, width=256), clock)
    assert "preprocess" not in clock.seconds and np.array_equal(repeat, fresh)
    run.cache = ReferenceKVCache(2**30)  # the K/V evicted behind the first-level key: decoded after all, same image
    clock = StageClock()
    assert np.array_equal(pipeline(_request("known bytes", refs, 4, height=256, width=256), clock), fresh)
    assert "preprocess" in clock.seconds


def test_limits_are_checked_before_the_first_component_call(served):
    pipeline, run = served
    run.calls.clear()
    request = _request("too big", [random_image(64, 256, seed=1)], 1)  # default size from it: 64 wide
    with pytest.raises(InvalidInput, match="output width 64 .* outside"):
        pipeline(request)
    assert run.calls == []


# ------------------------------------------------------------------ parsing, without a server


def _png(width, height, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


BAD = {
    "no prompt": ({}, "'prompt' is required"),
    "empty prompt": ({"prompt": np.array([b"  "], dtype=np.object_)}, "non-empty"),
    "not utf-8": ({"prompt": np.array([b"\xff\xfe"], dtype=np.object_)}, "not valid UTF-8"),
    "two prompts": ({"prompt": np.array([b"a", b"b"], dtype=np.object_)}, "exactly one value"),
    "too many references": ({"image": np.array([_png(64, 64)] * 5, dtype=np.object_)}, "at most 4 allowed"),
    "not an image": ({"image": np.array([b"GIF89a nope"], dtype=np.object_)}, "not a decodable"),
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
    request = parse({"prompt": np.array([b"a cat"], dtype=np.object_), "image": np.array([truncated], dtype=np.object_)},
                    LIMITS)
    run.calls.clear()
    with pytest.raises(InvalidInput, match=r"'image\[0\]' could not be decoded"):
        pipeline(request)
    assert run.calls == []


@pytest.mark.parametrize("mode", ["RGBA", "L", "P", "I;16", "1"])
def test_every_png_mode_decodes_to_rgb(mode):
    assert decode_image(_png(96, 80, mode), 0, LIMITS).mode == "RGB"
