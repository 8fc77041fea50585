"""A small Python API for calling `flux2_klein_kv` from production code.

    from flux2_serving.clients.api import Flux2Client
    images = Flux2Client("127.0.0.1:8001").generate("a red fox", images=["ref.png"], seed=7)
    images.seed   # the seed used: the one sent, or the random one drawn (pass it back to reproduce)
    images.notes  # what the server changed in the request, one line each (e.g. a reference cropped)

`Flux2Client` is synchronous over gRPC or HTTP (binary tensors on HTTP, never JSON arrays of
pixels); `AsyncFlux2Client` uses `tritonclient.grpc.aio` for many concurrent callers in one
event loop. Both return a list of PIL images (a `Generation`: the list, with `.seed` and `.notes`).
Server-side rejections raise `Flux2Error` whose message is the server's one line naming the field
at fault; an address that answers the other protocol raises `WrongProtocol`, saying which; a request
that cannot be sent at all (a prompt that is not Unicode text) raises `InvalidRequest`, naming the field.
"""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import urllib.error
import urllib.request
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from flux2_serving.contract.interface import DEFAULT_OUTPUTS, PUBLIC_INPUTS, GenerationOptions
from flux2_serving.contract.names import BLS_MODEL as MODEL
from flux2_serving.contract.names import DEAD_PROCESS, OVERLOADED_MARKS, ROUTING_HEADER
from flux2_serving.contract.reference_key import encoded_reference_key

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
PROTOCOL_NAMES = {"grpc": "gRPC", "http": "HTTP"}
# ROUTING_HEADER (HTTP header / gRPC metadata key) for gateways in front of several replicas: the
# sha256 of the request's encoded references, the BLS's own first-level cache key. A gateway that
# hashes on it (deploy/nginx/flux2-gateway.conf) sends every edit of one reference set to one
# replica, whose reference K/V cache then holds it. Absent for text-to-image.


def _scalar_types() -> dict:
    """name -> (numpy type, Triton wire type) of the scalar inputs, from the served model's declaration."""
    # tritonclient is imported where it is used throughout this module: its gRPC and HTTP halves need
    # different extras (grpcio / geventhttpclient), and a service installs the one it speaks.
    from tritonclient.utils import triton_to_np_dtype

    return {f.name: (triton_to_np_dtype(f.datatype), f.datatype) for f in PUBLIC_INPUTS if f.datatype != "BYTES"}


SCALAR_TYPES = _scalar_types()


class Flux2Error(RuntimeError):
    """The server refused or failed a request; `status` is Triton's code (e.g. INVALID_ARGUMENT / 400).
    `retryable`: the same request sent again (later, or to another replica) can succeed: UNAVAILABLE
    (gRPC) or HTTP 502/503/504, a full queue, or a process of the server that died (Triton's INTERNAL
    "Stub process ... is not healthy": the launcher's supervisor replaces it)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status
        self.retryable = ((status is not None and any(code in status for code in UNAVAILABLE))
                          or any(mark in message for mark in (*OVERLOADED_MARKS, DEAD_PROCESS, "RST_STREAM")))


class InvalidRequest(Flux2Error, ValueError):
    """A request this client cannot send, refused before anything travels (e.g. a prompt that is not
    Unicode text: a lone surrogate has no UTF-8 bytes); the message names the field."""

    def __init__(self, message: str):
        super().__init__(message, "INVALID_ARGUMENT")


class WrongProtocol(Flux2Error):
    """`url` answers another protocol than the client's: `answers` is "http" or "grpc"; `triton` False
    for an HTTP server that is not Triton's inference endpoint (its metrics port, another service).
    Sending the request again will not help: the address or the protocol must change."""

    def __init__(self, url: str, protocol: str, answers: str, triton: bool = True):
        self.url, self.protocol, self.answers, self.triton = url, protocol, answers, triton
        super().__init__(self.explain(f"protocol={answers!r}"))

    def explain(self, switch: str) -> str:
        """The one-line message, with `switch` saying how to change protocol (the CLI: --protocol http)."""
        ours, theirs = PROTOCOL_NAMES[self.protocol], PROTOCOL_NAMES[self.answers]
        port = DEFAULT_URLS[self.protocol].rsplit(":", 1)[1]
        if not self.triton:
            return (f"{self.url} answers HTTP, but it is not Triton's inference endpoint (its metrics port?): "
                    f"give the {ours} port ({port} by default)")
        return f"{self.url} answers {theirs}, not {ours}: use {switch}, or the {ours} port ({port} by default)"


def answers_http(url: str, timeout: float = 2.0) -> bool | None:
    """Whether `url` answers HTTP/1.1 GET /v2 as Triton's HTTP endpoint does (True: the server's
    metadata, KServe v2), as another HTTP server (False: e.g. Triton's metrics port, which answers
    every path), or not at all (None)."""
    try:
        with urllib.request.urlopen(f"http://{url}/v2", timeout=timeout) as response:
            body = response.read(1 << 16)
    except urllib.error.HTTPError:  # an HTTP answer all the same
        return False
    except (OSError, http.client.HTTPException, ValueError):
        return None
    try:
        metadata = json.loads(body)
    except ValueError:
        return False
    return isinstance(metadata, dict) and "version" in metadata and "extensions" in metadata


def answers_grpc(url: str, timeout: float = 2.0) -> bool:
    """Whether a Triton gRPC endpoint answers at `url` (False without tritonclient's gRPC part)."""
    try:
        import tritonclient.grpc as grpc
    except ImportError:
        return False
    try:
        client = grpc.InferenceServerClient(url)
        try:
            return bool(client.is_server_live(client_timeout=timeout))
        finally:
            client.close()
    except Exception:  # whatever the reason, it does not answer gRPC
        return False


def wrong_protocol(url: str, protocol: str) -> WrongProtocol | None:
    """After a connection failure of `protocol` at `url`: WrongProtocol when the port answers the other
    one (8000 is HTTP and 8001 gRPC by default; a gRPC client at an HTTP port sees "Socket closed", an
    HTTP client at a gRPC port an unparsable answer), else None."""
    if protocol == "grpc":
        triton = answers_http(url)
        return None if triton is None else WrongProtocol(url, protocol, "http", triton=triton)
    return WrongProtocol(url, protocol, "grpc") if answers_grpc(url) else None


def _cannot_connect(exc) -> bool:
    """A gRPC error that says no connection could be made (refused, or the peer closed it: not gRPC)."""
    return "UNAVAILABLE" in str(exc.status()) and "failed to connect" in str(exc.message())


class Generation(list):
    """What generate() returns: the PIL images, as a list, with the `seed` of their noise (the one
    sent, or the random one the server drew: pass it back as seed= to reproduce them) and the
    server's `notes`, one line per change it made to the request (prompt cut to the text length, a
    reference's alpha channel dropped, a reference resized or cropped); empty when none."""

    def __init__(self, images=(), seed: int | None = None, notes=()):
        super().__init__(images)
        self.seed, self.notes = seed, list(notes)


def encode_image(image) -> bytes:
    """Encoded image bytes from a path, raw bytes (sent as they are) or a PIL image (PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def utf8(name: str, text: str) -> bytes:
    """`text` as UTF-8; InvalidRequest naming `name` for a string that has none (a lone surrogate, as a
    JSON "\\ud800" escape or an undecodable command-line byte gives)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"'{name}' is not valid Unicode text: character {exc.start} is a lone surrogate "
                             f"({text[exc.start]!r}), which has no UTF-8 encoding; send UTF-8 text") from None


def request_tensors(prompt: str | None, images=(), **scalars) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (array, Triton dtype) for one request; scalars left as None are not sent."""
    tensors = {}
    if prompt is not None:
        tensors["prompt"] = (np.array([utf8("prompt", prompt)], dtype=np.object_), "BYTES")
    if images:
        tensors["image"] = (np.array([encode_image(image) for image in images], dtype=np.object_), "BYTES")
    for name, value in scalars.items():
        if value is not None:
            numpy_type, triton_type = SCALAR_TYPES[name]
            tensors[name] = (np.array([value], dtype=numpy_type), triton_type)
    return tensors


def routing_headers(tensors: dict) -> dict[str, str]:
    """{ROUTING_HEADER: key} for a request with references, {} without."""
    if "image" not in tensors:
        return {}
    encoded = [bytes(data) for data in tensors["image"][0].reshape(-1)]
    return {ROUTING_HEADER: encoded_reference_key(encoded)}


def infer_inputs(module, tensors: dict[str, tuple[np.ndarray, str]]) -> list:
    """tritonclient InferInputs; binary on HTTP (module is tritonclient.grpc or tritonclient.http)."""
    binary = {"binary_data": True} if module.__name__.endswith("http") else {}
    inputs = []
    for name, (array, dtype) in tensors.items():
        tensor = module.InferInput(name, list(array.shape), dtype)
        tensor.set_data_from_numpy(array, **binary)
        inputs.append(tensor)
    return inputs


def requested_outputs(module, names=("images",)) -> list:
    binary = {"binary_data": True} if module.__name__.endswith("http") else {}
    return [module.InferRequestedOutput(name, **binary) for name in names]


def to_pil(result) -> list[Image.Image]:
    return [Image.fromarray(array) for array in result.as_numpy("images")]


def to_generation(result) -> Generation:
    """A result with the outputs images, seed and notes as a Generation."""
    seed, notes = result.as_numpy("seed"), result.as_numpy("notes")
    return Generation(to_pil(result), None if seed is None else int(seed.reshape(-1)[0]),
                      [] if notes is None else [bytes(note).decode() for note in notes.reshape(-1)])


UNAVAILABLE = ("UNAVAILABLE", "502", "503", "504")  # gRPC status, or HTTP status from a gateway
UNAVAILABLE_HINT = (" (unavailable: the server, or the replica a gateway sent this request to, went away while the "
                    "request was in flight or could not be reached; it can be sent again)")
# Triton's answers when the BLS's bounded queue refuses a request, and the BLS's when a component's is full.
OVERLOADED_HINT = (" (overloaded: a queue of the server was full, or the request waited its queue timeout; it was "
                   "not completed: send it again later, or to another replica)")


# A repository assembled before an output was declared (its config.pbtxt lacks it) refuses a request for it.
STALE_REPOSITORY_HINT = (" (the served model repository was assembled before this output existed: assemble it "
                         "again, `make repository` or python -m flux2_serving.serving.repository)")


def _error(exc) -> Flux2Error:
    status = str(exc.status()) if hasattr(exc, "status") and exc.status() is not None else None
    message = " ".join(str(exc.message() if hasattr(exc, "message") else exc).split())
    if "unexpected inference output" in message:
        return Flux2Error(message + STALE_REPOSITORY_HINT, status)
    if any(text in message for text in OVERLOADED_MARKS):
        return Flux2Error(message + OVERLOADED_HINT, status)
    if (status is not None and any(code in status for code in UNAVAILABLE)) or "RST_STREAM" in message:
        if "<html" in message:  # a gateway's error page, not Triton's JSON
            message = f"HTTP {status} from the gateway"
        message += UNAVAILABLE_HINT
    return Flux2Error(message, status)


def _arguments(prompt, images, options: dict) -> dict:
    """The request's tensors; `options` are GenerationOptions' fields (diffusers' names), unknown ones refused."""
    return request_tensors(prompt, images, **asdict(GenerationOptions(**options)))


def timeout_arguments(protocol: str, timeout_s: float | None) -> dict:
    """tritonclient's infer() arguments for a deadline of `timeout_s`: Triton's `timeout` request
    parameter (microseconds: the longest wait in the BLS's queue, and the BLS stops the request at its
    next step once it has run that long), and on gRPC the call's deadline (a missed deadline cancels
    the request on the server). HTTP has no deadline on the wire: the client closes the connection."""
    if not timeout_s:
        return {}
    return {"timeout": int(timeout_s * 1e6), **({"client_timeout": timeout_s} if protocol == "grpc" else {})}


class Flux2Client:
    """Synchronous client; one instance per thread (tritonclient clients are not thread-safe)."""

    def __init__(self, url: str | None = None, protocol: str = "grpc", model: str = MODEL,
                 timeout_s: float | None = None):
        if protocol == "grpc":
            import tritonclient.grpc as module
        elif protocol == "http":
            import tritonclient.http as module
        else:
            raise ValueError(f"protocol must be 'grpc' or 'http', got {protocol!r}")
        self.module, self.protocol, self.model, self.timeout_s = module, protocol, model, timeout_s
        options = ({"network_timeout": timeout_s, "connection_timeout": timeout_s}
                   if protocol == "http" and timeout_s else {})
        self.url = url or DEFAULT_URLS[protocol]
        self.client = module.InferenceServerClient(self.url, **options)

    def infer(self, tensors: dict, outputs=("images",)):
        """The raw tritonclient result for prepared `request_tensors`."""
        from tritonclient.utils import InferenceServerException

        try:
            return self.client.infer(self.model, infer_inputs(self.module, tensors),
                                     outputs=requested_outputs(self.module, outputs),
                                     headers=routing_headers(tensors) or None,
                                     **timeout_arguments(self.protocol, self.timeout_s))
        except InferenceServerException as exc:
            if _cannot_connect(exc):
                raise (wrong_protocol(self.url, self.protocol) or _error(exc)) from None
            raise _error(exc) from None
        except (OSError, http.client.HTTPException) as exc:  # HTTP only: gRPC reports these as above
            raise self._transport_error(exc) from None

    def _transport_error(self, exc: Exception) -> Flux2Error:
        """An HTTP connection that failed: refused, reset, timed out or closed (UNAVAILABLE: it can be
        sent again), or answered with something that is not HTTP/1.1 (a gRPC port: WrongProtocol)."""
        from geventhttpclient.response import HTTPConnectionClosed

        if isinstance(exc, OSError | HTTPConnectionClosed):
            return Flux2Error(f"{self.url}: {type(exc).__name__}: {exc}{UNAVAILABLE_HINT}", "UNAVAILABLE")
        return wrong_protocol(self.url, self.protocol) or Flux2Error(
            f"{self.url}: the answer is not HTTP ({type(exc).__name__}: {exc})")

    def generate(self, prompt: str, images=(), **options) -> Generation:
        """Text-to-image without `images`; an edit with 1-4 reference images (paths, bytes or PIL).
        `options`: GenerationOptions' fields, diffusers' names (height, width, seed, num_images_per_prompt,
        num_inference_steps, reuse_reference_cache); left out, the server's defaults. Returns the list
        of PIL images, with `.seed` and `.notes` (Generation)."""
        return to_generation(self.infer(_arguments(prompt, images, options), DEFAULT_OUTPUTS))

    def close(self):
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class AsyncFlux2Client:
    """asyncio gRPC client: `await client.generate(...)` from many tasks at once."""

    def __init__(self, url: str | None = None, model: str = MODEL, timeout_s: float | None = None):
        import tritonclient.grpc as module
        import tritonclient.grpc.aio as aio

        self.module, self.model, self.timeout_s = module, model, timeout_s
        self.url = url or DEFAULT_URLS["grpc"]
        self.client = aio.InferenceServerClient(self.url)

    async def generate(self, prompt: str, images=(), **options) -> Generation:
        """As Flux2Client.generate."""
        from tritonclient.utils import InferenceServerException

        tensors = _arguments(prompt, images, options)
        try:
            result = await self.client.infer(self.model, infer_inputs(self.module, tensors),
                                             outputs=requested_outputs(self.module, DEFAULT_OUTPUTS),
                                             headers=routing_headers(tensors) or None,
                                             **timeout_arguments("grpc", self.timeout_s))
        except InferenceServerException as exc:
            if _cannot_connect(exc):
                raise (await asyncio.to_thread(wrong_protocol, self.url, "grpc") or _error(exc)) from None
            raise _error(exc) from None
        return to_generation(result)

    async def close(self):
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
