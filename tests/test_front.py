"""The OpenAI Images API front (issue 22), driven by the official `openai` client against a real
tritonserver (the tiny model): its images equal the gRPC client's for the same seed, every error is
OpenAI's shape with the status and `param` stated, and concurrent callers get their own results."""

from __future__ import annotations

import base64
import http.client
import io
import json
import secrets
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
from openai.types import ImagesResponse
from PIL import Image
from tritonclient.utils import InferenceServerException

from flux2_serving.clients.api import Flux2Client, request_tensors, routing_headers
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.interface import GenerationOptions
from flux2_serving.contract.names import QUEUE_FULL, QUEUE_TIMEOUT, ROUTING_HEADER
from flux2_serving.devtools.metrics import metric_by_label
from flux2_serving.devtools.pictures import synthetic_reference
from flux2_serving.front.__main__ import KEYS_VARIABLE, api_keys
from flux2_serving.front.app import DEFAULT_MODEL_ID
from flux2_serving.front.errors import from_triton
from flux2_serving.front.fields import ImageRequest
from flux2_serving.front.serve import running_front
from flux2_serving.front.triton import call_arguments
from flux2_serving.server.launch import free_port
from tests.support import BLS_INSTANCES, png_bytes, random_image, run_module, wait_until_served

KEY = f"test-{secrets.token_hex(8)}"
SMALL_BODY = 32 * 1024
FAST = {"num_inference_steps": 2}  # the tiny model's CPU time; the comparisons hold at any count
REFERENCES = [synthetic_reference(size, hue) for size, hue in
              (((256, 320), 40), ((64, 64), 90), ((96, 64), 150), ((64, 128), 210))]


@pytest.fixture(scope="module")
def front(triton_server):
    with running_front(triton_server["grpc"], api_keys=(KEY,)) as running:
        yield running


@pytest.fixture(scope="module")
def client(front):
    with openai.OpenAI(base_url=front.url, api_key=KEY, max_retries=0, timeout=300) as openai_client:
        yield openai_client


@pytest.fixture(scope="module")
def small_front(triton_server):
    """Keys off, a 32 KiB body limit, and response_format=url served from its own address."""
    port = free_port()
    with running_front(triton_server["grpc"], port=port, max_body_bytes=SMALL_BODY,
                       url_base=f"http://127.0.0.1:{port}") as running:
        yield running


def pixels(encoded: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(encoded)))


def decoded(response) -> list[np.ndarray]:
    return [pixels(base64.b64decode(item.b64_json)) for item in response.data]


def by_grpc(triton_server, prompt, references=(), **options):
    with Flux2Client(triton_server["grpc"]) as grpc_client:
        return grpc_client.generate(prompt, references, **options)


def assert_same_images(got, want):
    assert len(got) == len(want)
    for mine, theirs in zip(got, want, strict=True):
        assert np.array_equal(mine, np.asarray(theirs))


def files(references):
    return [(f"ref{index}.png", data, "image/png") for index, data in enumerate(references)]


def error_of(call, *args, **kwargs) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        call(*args, **kwargs)
    error = caught.value
    assert set(error.body) == {"message", "type", "param", "code"}, error.body  # OpenAI's shape
    return error


@pytest.mark.parametrize("n", [1, 2])
def test_generate_equals_the_grpc_client(triton_server, client, n):
    started = int(time.time())
    response = client.images.generate(model=DEFAULT_MODEL_ID, prompt="a lighthouse at dusk", n=n, size="256x256",
                                      extra_body={"seed": 11, **FAST})
    assert isinstance(response, ImagesResponse) and started - 1 <= response.created <= time.time() + 1
    assert (response.output_format, response.size, response.usage, response.seed) == ("png", "256x256", None, 11)
    want = by_grpc(triton_server, "a lighthouse at dusk", seed=11, num_images_per_prompt=n, height=256, width=256,
                   **FAST)
    assert_same_images(decoded(response), want)


@pytest.mark.parametrize("count", [1, 4])
def test_edit_equals_the_grpc_client(triton_server, client, count):
    """One reference as `image` (the output takes its size: no `size` sent), four as `image[]` (with
    a size, and a form boolean: the reference cache bypassed)."""
    references = REFERENCES[:count]
    if count == 1:
        response = client.images.edit(image=files(references)[0], prompt="the same scene in winter",
                                      extra_body={"seed": 5, **FAST})
        want = by_grpc(triton_server, "the same scene in winter", references, seed=5, **FAST)
    else:
        response = client.images.edit(image=files(references), prompt="the same scene in winter", size="256x256",
                                      extra_body={"seed": 5, "reuse_reference_cache": False, **FAST})
        want = by_grpc(triton_server, "the same scene in winter", references, seed=5, height=256, width=256,
                       reuse_reference_cache=False, **FAST)
    assert_same_images(decoded(response), want)
    assert response.size == ("256x320" if count == 1 else "256x256")
    assert response.notes == want.notes and response.seed == 5


@pytest.mark.parametrize("output_format", ["jpeg", "webp"])
def test_jpeg_and_webp_are_the_same_picture(triton_server, client, output_format):
    """Encoded by Pillow at output_compression as the quality: the bytes Pillow makes of the gRPC client's image."""
    response = client.images.generate(prompt="a red kite", size="256x320", output_format=output_format,
                                      output_compression=90, extra_body={"seed": 3, **FAST})
    encoded = base64.b64decode(response.data[0].b64_json)
    image = Image.open(io.BytesIO(encoded))
    assert (image.format, image.size, response.output_format) == (output_format.upper(), (256, 320), output_format)
    want, buffer = by_grpc(triton_server, "a red kite", seed=3, height=320, width=256, **FAST)[0], io.BytesIO()
    want.save(buffer, format=output_format.upper(), quality=90)
    assert encoded == buffer.getvalue()


def test_url_format_when_configured(triton_server, small_front):
    with openai.OpenAI(base_url=small_front.url, api_key="unused", max_retries=0) as keyless:
        response = keyless.images.generate(prompt="a kettle", size="256x256", response_format="url",
                                           extra_body={"seed": 2, **FAST})
    with urllib.request.urlopen(response.data[0].url) as answer:
        assert answer.headers["content-type"] == "image/png"
        got = pixels(answer.read())
    assert np.array_equal(got, np.asarray(by_grpc(triton_server, "a kettle", seed=2, height=256, width=256,
                                                  **FAST)[0]))
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(response.data[0].url.rsplit("/", 1)[0] + "/unknown.png")
    assert missing.value.code == 404


GENERATE_400 = {
    "size not WxH": ({"size": "large"}, "size", "'WIDTHxHEIGHT'"),
    "size off the envelope": ({"size": "256x250"}, "size", "multiple of 16 in [256, 1440]"),
    "n too large": ({"n": 9}, "n", "[1, 4]"),
    "quality": ({"quality": "high"}, "quality", "'auto'"),
    "url format": ({"response_format": "url"}, "response_format", "b64_json"),
    "png compression": ({"output_compression": 50}, "output_compression", "jpeg and webp"),
    "unknown field": ({"extra_body": {"guidance_scale": 4}}, "guidance_scale", "unknown parameter"),
    "bad seed": ({"extra_body": {"seed": -1}}, "seed", ">= 0"),
    "steps": ({"extra_body": {"num_inference_steps": 51}}, "num_inference_steps", "[1, 50]"),
}


@pytest.mark.parametrize("case", GENERATE_400)
def test_generation_mistakes_are_400_naming_the_field(client, case):
    fields, param, words = GENERATE_400[case]
    error = error_of(client.images.generate, prompt="x", **fields)
    assert (error.status_code, error.param, error.type) == (400, param, "invalid_request_error"), error.body
    assert words in error.message, error.message


EDIT_400 = {
    "mask": (dict(image=files(REFERENCES[:1])[0], mask=files(REFERENCES[:1])[0]), "mask", "not supported"),
    "5 references": (dict(image=files(REFERENCES + REFERENCES[:1])), "image", "at most 4"),
    "not an image": (dict(image=("ref.png", b"not an image at all", "image/png")), "image", "not a decodable"),
    "input fidelity": (dict(image=files(REFERENCES[:1])[0], input_fidelity="high"), "input_fidelity", "'low'"),
}


@pytest.mark.parametrize("case", EDIT_400)
def test_edit_mistakes_are_400_naming_the_field(client, case):
    fields, param, words = EDIT_400[case]
    error = error_of(client.images.edit, prompt="x", **fields)
    assert (error.status_code, error.param) == (400, param), error.body
    assert words in error.message, error.message


def test_keys_are_checked(front, client):
    with openai.OpenAI(base_url=front.url, api_key="wrong-key", max_retries=0) as other:
        for headers in ({"Authorization": openai.omit}, {}):  # no key at all, a wrong one
            error = error_of(other.images.generate, prompt="x", size="256x256", extra_headers=headers)
            assert (error.status_code, error.code) == (401, "invalid_api_key")
            assert error.response.headers["www-authenticate"] == "Bearer"
            assert ("no API key" in error.message) == bool(headers), error.message
    with urllib.request.urlopen(f"{front.root}/health") as live:  # health stays open
        assert live.status == 200
    assert [model.id for model in client.models.list()] == [DEFAULT_MODEL_ID]
    assert client.models.retrieve(DEFAULT_MODEL_ID).id == DEFAULT_MODEL_ID


def test_unknown_model_and_route_are_404(client):
    error = error_of(client.images.generate, model="dall-e-3", prompt="x")
    assert (error.status_code, error.code, error.param) == (404, "model_not_found", "model")
    assert (error_of(client.models.retrieve, "dall-e-3").code) == "model_not_found"
    error = error_of(client.get, "/images/variations", cast_to=object)
    assert (error.status_code, error.code) == (404, "not_found")


def test_bodies_over_the_limit_are_413_before_parsing(small_front):
    with openai.OpenAI(base_url=small_front.url, api_key="unused", max_retries=0) as keyless:
        big = png_bytes(random_image(160, 160, 1))  # ~77 KiB of noise
        error = error_of(keyless.images.edit, image=("big.png", big, "image/png"), prompt="x")
        assert (error.status_code, error.code) == (413, "request_too_large")
        assert str(SMALL_BODY) in error.message
        error = error_of(keyless.images.generate, prompt="x" * (SMALL_BODY + 1))
        assert error.status_code == 413
    # A chunked body declares no length: counted while it arrives (the openai client always sends one).
    connection = http.client.HTTPConnection(small_front.root.removeprefix("http://"), timeout=30)
    connection.request("POST", "/v1/images/generations", body=iter([b'{"prompt": "', b"x" * SMALL_BODY, b'"}']),
                       headers={"Content-Type": "application/json"}, encode_chunked=True)
    answer = connection.getresponse()
    assert answer.status == 413 and json.loads(answer.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_unreachable_triton_is_503_without_its_address_or_grpc_text():
    """503 with Retry-After, saying what happened but neither where Triton is nor what gRPC said (those
    name hosts and ports inside the deployment): the front's log has them."""
    port = free_port()
    with running_front(f"127.0.0.1:{port}") as dead:
        with pytest.raises(urllib.error.HTTPError) as not_ready:
            urllib.request.urlopen(f"{dead.root}/health/ready")
        readiness = json.loads(not_ready.value.read())["error"]
        assert (not_ready.value.code, readiness["code"]) == (503, "service_unavailable")
        assert int(not_ready.value.headers["retry-after"]) > 0
        with openai.OpenAI(base_url=dead.url, api_key="unused", max_retries=0) as unlucky:
            error = error_of(unlucky.images.generate, prompt="x", size="256x256")
        assert (error.status_code, error.code) == (503, "service_unavailable")
        assert int(error.response.headers["retry-after"]) > 0
        for message in (readiness["message"], error.message):
            assert "inference server" in message, message
            for leak in (str(port), "127.0.0.1", "ipv4", "StatusCode", "UNAVAILABLE", "failed to connect", "Socket"):
                assert leak not in message, (leak, message)
        time.sleep(0.2)  # the log line is written after the answer
        log = dead.log_text()
        assert f"127.0.0.1:{port}" in log and "UNAVAILABLE" in log, log[-2000:]


def test_a_prompt_that_is_not_unicode_is_400(front):
    """JSON can escape a lone surrogate ("\\ud800"), which has no UTF-8 bytes: 400 naming the field,
    in OpenAI's shape, whatever field holds it (an unknown one is quoted back, escaped)."""
    bodies = {"prompt": b'{"prompt": "a \\ud800 fox", "size": "256x256"}',
              "user": b'{"prompt": "a fox", "user": "\\udfff"}',
              "\ud800": b'{"prompt": "a fox", "\\ud800": 1}'}
    for param, body in bodies.items():
        request = urllib.request.Request(f"{front.url}/images/generations", body, method="POST",
                                         headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request)
        error = json.loads(refused.value.read())["error"]
        assert refused.value.code == 400 and set(error) == {"message", "type", "param", "code"}, error
        assert error["param"] == param, error
        if param != "\ud800":
            assert f"'{param}' is not valid Unicode text" in error["message"], error


def test_ready_when_triton_is(front):
    with urllib.request.urlopen(f"{front.root}/health/ready") as ready:
        assert ready.status == 200


def _triton_error(message, status):
    return InferenceServerException(msg=message, status=status)


def test_triton_answers_map_to_openai_statuses():
    """On tritonclient's own exception objects (a queue-full answer is also provoked for real: the last test)."""
    cases = [
        (f"{QUEUE_FULL}", "StatusCode.UNAVAILABLE", 429, "rate_limit_exceeded", None),
        (f"{QUEUE_TIMEOUT}", "StatusCode.UNAVAILABLE", 429, "rate_limit_exceeded", None),
        ("'height' is 260; it must be a multiple of 16 in [256, 1440]", "StatusCode.INVALID_ARGUMENT", 400,
         "invalid_value", "size"),
        ("'num_images_per_prompt' is 9; it must be in [1, 4]", "StatusCode.INVALID_ARGUMENT", 400, "invalid_value",
         "n"),
        ("'image[2]' is not a decodable PNG/JPEG/WebP image", "StatusCode.INVALID_ARGUMENT", 400, "invalid_value",
         "image"),
        ("failed to connect to all addresses", "StatusCode.UNAVAILABLE", 503, "service_unavailable", None),
        ("Server not ready", "StatusCode.UNAVAILABLE", 503, "service_unavailable", None),
        ("Deadline Exceeded", "StatusCode.DEADLINE_EXCEEDED", 504, "timeout", None),
        ("stub crashed at 0x7f...", "StatusCode.INTERNAL", 500, "server_error", None),
        ("unexpected inference output 'png'", "StatusCode.INVALID_ARGUMENT", 500, "server_error", None),
    ]
    for message, status, http_status, code, param in cases:
        error = from_triton(_triton_error(message, status), "rid-1")
        assert (error.status, error.code, error.param) == (http_status, code, param), message
    queue_full = from_triton(_triton_error(QUEUE_FULL, "StatusCode.UNAVAILABLE"), "rid-1")
    assert int(queue_full.headers["Retry-After"]) > 0
    internal = from_triton(_triton_error("stub crashed at 0x7f...", "StatusCode.INTERNAL"), "rid-1")
    assert "rid-1" in internal.message and "0x7f" not in internal.message


def test_concurrent_callers_get_their_own_images(triton_server, client):
    """Six callers at once, generations and edits, each with its own seed and prompt: every answer
    equals the same request sent alone."""
    def request(index):
        return dict(prompt=f"caller {index}", seed=100 + index,
                    references=[REFERENCES[index % 2 + 1]] if index % 2 else [])

    def send(index):
        asked = request(index)
        extra = {"extra_body": {"seed": asked["seed"], **FAST}, "size": "256x256"}
        if asked["references"]:
            return client.images.edit(image=files(asked["references"]), prompt=asked["prompt"], **extra)
        return client.images.generate(prompt=asked["prompt"], **extra)

    with ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(send, range(6)))
    for index, response in enumerate(responses):
        asked = request(index)
        alone = by_grpc(triton_server, asked["prompt"], asked["references"], seed=asked["seed"], height=256,
                        width=256, **FAST)
        assert_same_images(decoded(response), alone)


def test_request_ids_logs_and_metrics(front, client):
    raw = client.images.with_raw_response.generate(prompt="an owl", size="256x256",
                                                   extra_body={"seed": 1, "num_inference_steps": 1},
                                                   extra_headers={"x-request-id": "front-test-42"}, user="alice")
    assert raw.headers["x-request-id"] == "front-test-42"
    hostile = "forged 200 OK user='admin'"  # not a token: it would forge a log line
    error = error_of(client.images.generate, prompt="x", size="big", extra_headers={"x-request-id": hostile})
    assert error.response.headers["x-request-id"] not in (hostile, "")  # a fresh one instead
    time.sleep(0.2)  # the log line is written after the answer
    log = front.log_text()
    assert "front-test-42 POST /v1/images/generations 200" in log and "user='alice'" in log
    assert "forged" not in log and "Traceback" not in log
    with urllib.request.urlopen(f"{front.root}/metrics") as answer:
        metrics = answer.read().decode()
    for line in ('flux2_front_requests_total{endpoint="/v1/images/generations",status="200"}',
                 'flux2_front_requests_total{endpoint="/v1/images/generations",status="400"}',
                 'flux2_front_triton_seconds_count{outcome="ok"}', "flux2_front_request_seconds_bucket",
                 "flux2_front_in_flight_requests"):
        assert line in metrics, line


def test_the_routing_header_is_the_python_clients():
    """The gRPC call carries the reference key exactly as Flux2Client sends it (the gateway's affinity)."""
    references = tuple(REFERENCES[:2])
    edit = ImageRequest("x", references, GenerationOptions(seed=1))
    headers = call_arguments(edit, "rid", 30)["headers"]
    assert headers == routing_headers(request_tensors("x", references, seed=1)) and ROUTING_HEADER in headers
    assert call_arguments(ImageRequest("x", (), GenerationOptions()), "rid", 30)["headers"] is None


def test_keys_come_from_the_file_and_the_environment(tmp_path):
    keys_file = tmp_path / "keys"
    keys_file.write_text("# rotated 2026-01\nfile-key\n\n  other-key  \n")
    assert api_keys(str(keys_file), {KEYS_VARIABLE: "env-key, ,second"}) == {"file-key", "other-key", "env-key",
                                                                              "second"}
    assert api_keys(None, {}) == frozenset()  # off unless given


def test_help_says_keys_are_off_unless_given():
    result = run_module("flux2_serving.front", "--help")
    assert result.returncode == 0
    for option in ("--triton-grpc", "--host", "--port", "--model-id", "--api-keys-file", "--max-body-bytes",
                   "--url-base", "--timeout-s", "FLUX2_FRONT_API_KEYS", "keys off"):
        assert option in result.stdout, option
    assert "127.0.0.1" in result.stdout


def test_a_caller_that_goes_away_cancels_its_triton_request(triton_server, front):
    """The openai client gives up after a second on a long request: the front cancels the gRPC call,
    and the BLS stops the request (outcome "cancelled") instead of computing it for nobody."""
    def outcomes():
        return metric_by_label(triton_server["metrics"], "flux2_bls_requests_total", "outcome")

    before = outcomes()
    with openai.OpenAI(base_url=front.url, api_key=KEY, max_retries=0, timeout=1.0) as hasty:
        with pytest.raises(openai.APITimeoutError):
            hasty.images.generate(prompt="a long one", size="1024x1024",
                                  extra_body={"seed": 1, "num_inference_steps": 8})
    deadline = time.monotonic() + 60
    while outcomes().get("cancelled", 0) == before.get("cancelled", 0) and time.monotonic() < deadline:
        time.sleep(0.5)
    after = outcomes()
    assert after["cancelled"] == before.get("cancelled", 0) + 1 and after["ok"] == before.get("ok", 0), after
    assert "the caller went away" in front.log_text() and " 499 " in front.log_text()


def test_a_full_triton_queue_is_429(triton_server):
    """A burst larger than the BLS's instances and queue (BLS_INSTANCES + bls_max_queue in the tests'
    server) of large requests: the excess is refused at once by Triton ("Exceeds maximum queue size")
    and answered 429 with Retry-After. The front gives up on the admitted ones after a few seconds
    (its timeout, which Triton also gets: 504), and the test waits until the server serves again."""
    burst, admitted = 24, BLS_INSTANCES + DEFAULT_ENVELOPE.bls_max_queue
    with running_front(triton_server["grpc"], timeout_s=4) as impatient, \
            openai.OpenAI(base_url=impatient.url, api_key="unused", max_retries=0, timeout=60) as burster:
        def send(index):
            try:
                burster.images.generate(prompt=f"burst {index}", size="1024x1024",
                                        extra_body={"seed": index, "num_inference_steps": 4})
                return 200, "", {}
            except openai.APIStatusError as exc:
                return exc.status_code, exc.message, dict(exc.response.headers)

        with ThreadPoolExecutor(burst) as pool:
            answers = list(pool.map(send, range(burst)))
    print("statuses:", sorted(status for status, _, _ in answers))
    refused = [(message, headers) for status, message, headers in answers if status == 429]
    assert len(refused) >= burst - admitted - 2, answers  # (one may leave the queue while the burst arrives)
    assert all(QUEUE_FULL in message or QUEUE_TIMEOUT in message for message, _ in refused)
    assert all(int(headers["retry-after"]) > 0 for _, headers in refused)
    assert {status for status, _, _ in answers} <= {200, 429, 504}, answers
    wait_until_served(triton_server["grpc"])  # the abandoned ones stop at their next step
