"""Hostile callers against a real tritonserver, over gRPC and HTTP: no caller can crash the server,
reach its control plane, use the internal models or make another caller's request fail.

Each test here failed on the server before the hardening (issue 18): two concurrent out-of-range
token ids crashed tritonserver; unload, load with a config or file override, shared-memory
registration and logging were open to any caller; reference_kv_cache answered anyone; a 1 MiB
prompt was tokenized. And after a hostile caller's probe: reference_kv_cache answered K/V without a
key with INTERNAL and an error line in the log, the component models answered anyone, and four
4096^2 PNGs were decoded before their token count was refused.

Direct calls of internal models send the tests' internal secret (tests/support.py INTERNAL), as the BLS does."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpc
import tritonclient.http as http
from PIL import Image
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

from flux2_serving.clients.api import Flux2Client, Flux2Error
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.names import cached_name
from flux2_serving.contract.security import INTERNAL_ONLY, INTERNAL_PARAMETER, admin_headers
from flux2_serving.devtools.metrics import metric_by_label
from flux2_serving.devtools.pictures import synthetic_reference
from tests.support import INTERNAL, model_counts, png_bytes

PROTOCOLS = ["grpc", "http"]
MODULES = {"grpc": grpc, "http": http}
TEXT_LEN = 512
INVALID = {"grpc": "StatusCode.INVALID_ARGUMENT", "http": "400"}


def client(server, protocol):
    return MODULES[protocol].InferenceServerClient(server[protocol])


def tensor(protocol, name, array, datatype):
    value = MODULES[protocol].InferInput(name, list(array.shape), datatype)
    value.set_data_from_numpy(array, **({"binary_data": True} if protocol == "http" else {}))
    return value


def call(server, protocol, model, inputs: dict, outputs=None, **kwargs):
    """One direct request: inputs {name: (array, Triton type)}; returns the result or the exception."""
    values = [tensor(protocol, name, array, datatype) for name, (array, datatype) in inputs.items()]
    try:
        return client(server, protocol).infer(model, values, **kwargs)
    except InferenceServerException as exc:
        return exc


def assert_invalid(result, protocol, *fragments):
    """INVALID_ARG, one line naming what is wrong, no traceback and no server path."""
    assert isinstance(result, InferenceServerException), f"accepted: {result}"
    message = str(result.message())
    assert str(result.status()) == INVALID[protocol], (result.status(), message)
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    assert "Traceback" not in message and not re.search(r"/(tmp|work|root|home|usr)/", message), message


def token_ids(value=5, batch=1, length=TEXT_LEN):
    return {"input_ids": (np.full((batch, length), value, np.int64), "INT64"),
            "attention_mask": (np.ones((batch, length), np.int64), "INT64")}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_concurrent_bad_component_calls_fail_alone_while_good_ones_are_served(triton_server, protocol):
    """Direct text_encoder calls, half with token ids outside the vocabulary, all at once (the dynamic
    batcher stacks them), next to a real request through the BLS: the server lives, the good calls
    get exactly what they get alone, each bad one gets its own INVALID_ARG."""
    good = call(triton_server, protocol, "text_encoder", token_ids(), parameters=INTERNAL).as_numpy("prompt_embeds")
    bad_inputs = [token_ids(10**9), token_ids(-1)]
    bad_inputs[0]["input_ids"][0][0, 3] = 10**9  # one bad id among good ones

    def job(index):
        if index == 0:  # a user's request through the public model, in flight meanwhile
            with Flux2Client(triton_server["grpc"]) as user:
                return user.generate("a lighthouse", [synthetic_reference((128, 128), 7)], height=256, width=256,
                                     seed=3, num_inference_steps=2)
        inputs = bad_inputs[index % 2] if index % 3 == 0 else token_ids()
        return index % 3 == 0, call(triton_server, protocol, "text_encoder", inputs, parameters=INTERNAL)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(job, range(32)))
    assert results[0][0].size == (256, 256)
    bad = [result for is_bad, result in results[1:] if is_bad]
    fine = [result for is_bad, result in results[1:] if not is_bad]
    assert len(bad) == 10 and len(fine) == 21
    for result in bad:
        assert_invalid(result, protocol, "'input_ids'", "token id")
    for result in fine:
        assert not isinstance(result, Exception), result
        np.testing.assert_array_equal(result.as_numpy("prompt_embeds"), good)
    assert client(triton_server, protocol).is_server_live()


def _latents(h, w, batch=1):
    return np.zeros((batch, h, w, 128), np.float32)


# Direct calls a caller could make, each outside what the component takes, and the words its answer must hold.
BAD_CALLS = {
    "text_encoder_4x4096_tokens": ("text_encoder", lambda: token_ids(batch=4, length=4096), ["4096", "512"]),
    "text_encoder_mask_not_0_1": ("text_encoder", lambda: {**token_ids(), "attention_mask": (
        np.full((1, TEXT_LEN), 7, np.int64), "INT64")}, ["'attention_mask'"]),
    "vae_decoder_beyond_1440px": ("vae_decoder", lambda: {"latents": (_latents(200, 16), "FP32")},
                                  ["'latents'", "lat_h = 200", "[16, 90]"]),
    "vae_encoder_not_a_multiple_of_16": ("vae_encoder",
                                         lambda: {"image": (np.zeros((1, 3, 72, 64), np.float32), "FP32")},
                                         ["'image'", "height = 72", "multiple of 16"]),
    "vae_encoder_over_the_reference_area": ("vae_encoder", lambda: {"image": (
        np.zeros((1, 3, 1024, 1040), np.float32), "FP32")}, ["'image'", "= 1064960", "at most 1048576"]),
    "transformer_cached_grid_mismatch": ("transformer_cached", lambda: {
        "latents": (_latents(16, 16), "FP32"), "prompt_embeds": (np.zeros((1, TEXT_LEN, 96), np.float32), "FP32"),
        "timestep": (np.ones(1, np.float32), "FP32"), "img_ids": (np.zeros((16, 20, 4), np.int64), "INT64"),
        "txt_ids": (np.zeros((TEXT_LEN, 4), np.int64), "INT64")}, ["lat_w"]),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_components_refuse_what_the_envelope_does_not_hold(triton_server, protocol, case):
    model, inputs, fragments = BAD_CALLS[case]
    inputs = inputs()
    if model == "transformer_cached":  # the tiny model's text width and K/V layout, from the served config
        dims = input_dims(triton_server, model)
        inputs["prompt_embeds"] = (np.zeros((1, TEXT_LEN, dims["prompt_embeds"][-1]), np.float32), "FP32")
        for name in (n for n in dims if n.startswith("ref_kv_")):
            inputs[name] = (np.zeros([2, 0, *dims[name][2:]], np.float32), "FP32")
    assert_invalid(call(triton_server, protocol, model, inputs, parameters=INTERNAL), protocol, *fragments)
    assert client(triton_server, protocol).is_server_ready()


def smallest_inputs(server, model: str) -> dict:
    """Inputs a served component takes, each dimension the smallest its envelope allows (its
    config's input_rules), filled with ones: valid token ids, mask, ids and pixels alike."""
    config = client(server, "grpc").get_model_config(model, as_json=True)["config"]
    rules = json.loads(config["parameters"]["input_rules"]["string_value"])
    types = {tensor["name"]: tensor["data_type"].removeprefix("TYPE_") for tensor in config["input"]}
    inputs = {}
    for name, axes in rules["dims"].items():
        shape = [axis if isinstance(axis, int) else rules["ranges"][axis][0] for axis in axes]
        inputs[name] = (np.ones(shape, triton_to_np_dtype(types[name])), types[name])
    return inputs


def new_log_lines(server, offset: int) -> list[str]:
    """tritonserver's log lines written after byte `offset`."""
    with open(server["log"], "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace").splitlines()


def error_lines(lines: list[str]) -> list[str]:
    """Triton's error lines (E0612 12:00:00.000 ...) and anything naming a Python exception."""
    return [line for line in lines if re.match(r"E\d{4} ", line) or "Error" in line or "Traceback" in line]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_components_answer_only_the_bls(triton_server, protocol):
    """Every component model refuses a caller without the server's internal secret, before reading its
    inputs, with one line and nothing in the server's log; with the secret (the BLS) it answers."""
    offset = Path(triton_server["log"]).stat().st_size
    for model in COMPONENTS:
        inputs = smallest_inputs(triton_server, model)
        for parameters in (None, {INTERNAL_PARAMETER: "guess"}, {INTERNAL_PARAMETER: 7}, {"other": "x"}):
            assert_invalid(call(triton_server, protocol, model, inputs, parameters=parameters), protocol,
                           f"{model}: {INTERNAL_ONLY}")
        answer = call(triton_server, protocol, model, inputs, parameters=INTERNAL)
        assert not isinstance(answer, Exception), (model, answer)

    def job(index):  # refused and served requests at once: the dynamic batcher hands them over together
        return index, call(triton_server, protocol, "text_encoder", token_ids(),
                           parameters=INTERNAL if index % 2 else None)

    with ThreadPoolExecutor(8) as pool:
        for index, result in pool.map(job, range(16)):
            if index % 2:
                assert not isinstance(result, Exception), result
            else:
                assert_invalid(result, protocol, INTERNAL_ONLY)
    assert error_lines(new_log_lines(triton_server, offset)) == []


def _evil_model_files() -> tuple[str, dict]:
    config = json.dumps({"backend": "python", "max_batch_size": 0,
                         "input": [{"name": "x", "data_type": "TYPE_INT32", "dims": [1]}],
                         "output": [{"name": "y", "data_type": "TYPE_INT32", "dims": [1]}]})
    source = (b"import os\nclass TritonPythonModel:\n    def initialize(self, args):\n"
              b"        open('/tmp/flux2_pwned', 'w')\n")
    return config, {"file:1/model.py": source}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_control_plane_is_closed_to_callers_without_the_admin_key(triton_server, protocol):
    c = client(triton_server, protocol)
    config, files = _evil_model_files()
    attempts = {
        "unload": lambda **k: c.unload_model("flux2_klein_kv", **k),
        "load with a file override": lambda **k: c.load_model("evil", config=config, files=files, **k),
        "load with a config override": lambda **k: c.load_model(
            "flux2_klein_kv",
            config=json.dumps({"parameters": {"max_num_inference_steps": {"string_value": "100000"}}}), **k),
        "system shared memory": lambda **k: c.register_system_shared_memory(
            "region", "/triton_python_backend_shm_region_1", 1024, **k),
        "CUDA shared memory": lambda **k: c.register_cuda_shared_memory("region", b"\0" * 64, 0, 1024, **k),
        "logging": lambda **k: c.update_log_settings({"log_verbose_level": 2}, **k),
        "trace": lambda **k: c.update_trace_settings(settings={"trace_level": ["TIMESTAMPS"]}, **k),
        "repository index": lambda **k: c.get_model_repository_index(**k),
    }
    wrong_key = {"grpc": {"triton-grpc-protocol-flux2-admin-key": "guess"}, "http": {"flux2-admin-key": "guess"}}
    for what, attempt in attempts.items():
        for headers in (None, wrong_key[protocol]):
            with pytest.raises(InferenceServerException, match="restricted") as refused:
                attempt(headers=headers)
            assert str(refused.value.status()) in ("StatusCode.UNAVAILABLE", "403"), (what, refused.value)
    assert not Path("/tmp/flux2_pwned").exists()
    assert c.is_model_ready("flux2_klein_kv")
    # Statistics are read-only and open (perf_analyzer reads them without a key: docs/security.md).
    assert c.get_inference_statistics("flux2_klein_kv")
    # Holders of the key (the watchdog, an operator) get through.
    headers = admin_headers(triton_server["admin_key"], protocol)
    index = c.get_model_repository_index(headers=headers)
    names = [entry.name for entry in index.models] if protocol == "grpc" else [entry["name"] for entry in index]
    assert "flux2_klein_kv" in names


def input_dims(server, model: str) -> dict[str, list[int]]:
    """{input: config.pbtxt dims} of a served model."""
    config = client(server, "grpc").get_model_config(model, as_json=True)["config"]
    return {i["name"]: [int(d) for d in i["dims"]] for i in config["input"]}


def _kv_shapes(server) -> dict:
    return {name: dims for name, dims in input_dims(server, "reference_kv_cache").items() if name.startswith("ref_kv_")}


def _key(text: bytes):
    return {"key": (np.array([text], dtype=np.object_), "BYTES")}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_reference_cache_answers_only_the_bls(triton_server, protocol):
    key = b"a" * 64
    kv = {name: (np.zeros([2, 16, *dims[2:]], np.float32), "FP32") for name, dims in _kv_shapes(triton_server).items()}
    for parameters in (None, {INTERNAL_PARAMETER: "guess"}):
        assert_invalid(call(triton_server, protocol, "reference_kv_cache", _key(key), parameters=parameters),
                       protocol, "internal")  # lookup: could tell whether someone used an image
        assert_invalid(call(triton_server, protocol, "reference_kv_cache", {**_key(key), **kv}, parameters=parameters),
                       protocol, "internal")  # store: could poison another caller's entry
    assert_invalid(call(triton_server, protocol, "reference_kv_cache", _key(b"\xff\xfe not utf-8")), protocol)
    # The liveness probe (the empty key) stays open: it touches nothing.
    probe = call(triton_server, protocol, "reference_kv_cache", _key(b""), outputs=None)
    assert not probe.as_numpy("hit")[0]


def test_the_reference_cache_keeps_valid_entries_and_bounds_a_store(triton_server):
    """Even with the secret, a store must be a complete K/V set of one consistent size within the
    envelope, and never replaces an entry; a non-hex key is refused."""
    internal = INTERNAL
    shapes = _kv_shapes(triton_server)
    names = sorted(shapes)
    key = b"0123456789abcdef" * 4

    def kv(tokens, fill):
        return {name: (np.full([2, tokens, *shapes[name][2:]], fill, np.float32), "FP32") for name in names}

    def store(inputs):
        return call(triton_server, "grpc", "reference_kv_cache", {**_key(key), **inputs}, parameters=internal)

    partial = dict(list(kv(16, 1.0).items())[:1])
    assert_invalid(store(partial), "grpc", "needs all")
    mixed = kv(16, 1.0)
    mixed[names[-1]] = (np.zeros([2, 32, *shapes[names[-1]][2:]], np.float32), "FP32")
    assert_invalid(store(mixed), "grpc", "same number of reference tokens")
    assert_invalid(store(kv(4097, 1.0)), "grpc", "[1, 4096]")
    assert not isinstance(store(kv(16, 1.0)), Exception)  # a valid entry
    store(kv(16, 2.0))  # an attempt to replace it: kept as it was
    found = call(triton_server, "grpc", "reference_kv_cache", _key(key), parameters=internal)
    assert found.as_numpy("hit")[0]
    assert (found.as_numpy(cached_name(names[0])) == 1.0).all()
    assert_invalid(call(triton_server, "grpc", "reference_kv_cache", _key(b"g" * 64), parameters=internal), "grpc",
                   "sha256")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_malformed_reference_cache_requests_are_refused_in_one_line_and_not_logged(triton_server, protocol):
    """K/V without a key, a key of the wrong type or count, K/V of the wrong type or shape, a secret
    that is not a string, no input at all: each INVALID_ARG (from Triton or from the model, with or
    without the secret), never INTERNAL, and no line in the server's log (a caller cannot fill it)."""
    shapes = _kv_shapes(triton_server)
    kv = {name: (np.zeros([2, 16, *dims[2:]], np.float32), "FP32") for name, dims in shapes.items()}
    first = sorted(shapes)[0]
    cases = {
        "K/V without a key": ({**kv}, ["'key' is required"]),
        "a key of INT64": ({"key": (np.array([1], np.int64), "INT64"), **kv}, []),
        "two keys": ({"key": (np.array([b"a" * 64, b"b" * 64], dtype=np.object_), "BYTES")}, []),
        "K/V of FP16": ({**_key(b"a" * 64), first: (np.zeros([2, 16, *shapes[first][2:]], np.float16), "FP16")}, []),
        "K/V of other heads": ({**_key(b"a" * 64), first: (np.zeros([2, 16, 3, 5], np.float32), "FP32")}, []),
        "no input": ({}, []),
    }
    offset = Path(triton_server["log"]).stat().st_size
    for parameters in (None, INTERNAL):
        for case, (inputs, fragments) in cases.items():
            result = call(triton_server, protocol, "reference_kv_cache", inputs, parameters=parameters)
            assert isinstance(result, InferenceServerException), case
            assert "internal error" not in str(result.message()), (case, result.message())
            assert_invalid(result, protocol, *fragments)
    secret_not_a_string = {INTERNAL_PARAMETER: 12345}
    assert_invalid(call(triton_server, protocol, "reference_kv_cache", _key(b"a" * 64),
                        parameters=secret_not_a_string), protocol, INTERNAL_ONLY)
    assert not call(triton_server, protocol, "reference_kv_cache", _key(b"")).as_numpy("hit")[0]  # still serving
    assert error_lines(new_log_lines(triton_server, offset)) == []


def test_references_over_the_token_limit_are_refused_before_any_decoding(triton_server):
    """Four 4096x4096 black PNGs (49 KB each, 4 x 4096 tokens after preprocessing): refused from their
    headers, before any pixel is decoded (that took 2.7 s) and before the VAE encoder runs."""
    black = png_bytes(Image.new("RGB", (4096, 4096)))
    encoded_before = model_counts(triton_server, "vae_encoder")
    with Flux2Client(triton_server["grpc"]) as user, pytest.raises(Flux2Error) as refused:
        user.generate("four big references", [black] * 4, num_inference_steps=1)
    message = str(refused.value)
    assert refused.value.status == "StatusCode.INVALID_ARGUMENT", message
    assert "'image': the references hold 16384 tokens" in message and "at most 4096 allowed" in message, message
    assert model_counts(triton_server, "vae_encoder") == encoded_before


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_oversized_prompt_is_refused_before_it_is_tokenized(triton_server, protocol):
    before = metric_by_label(triton_server["metrics"], "flux2_bls_requests_total", "outcome")
    with Flux2Client(triton_server[protocol], protocol) as user, pytest.raises(Flux2Error) as refused:
        user.generate("a" * 2**20)
    assert "'prompt' is 1048576 bytes; at most 16384 bytes allowed" in str(refused.value)
    assert refused.value.status in ("StatusCode.INVALID_ARGUMENT", "400")
    with Flux2Client(triton_server[protocol], protocol) as user, pytest.raises(Flux2Error, match="'image\\[0\\]' is"):
        user.generate("an edit", [b"\x89PNG" + b"\0" * (64 * 2**20 + 1)])  # over max_reference_bytes
    after = metric_by_label(triton_server["metrics"], "flux2_bls_requests_total", "outcome")
    assert after["invalid"] - before.get("invalid", 0) == 2  # counted by outcome, visible to monitoring
