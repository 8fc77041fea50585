"""A small Python API for calling `flux2_klein_kv` from production code.

    from flux2_serving.clients.api import Flux2Client
    images = Flux2Client("127.0.0.1:8001").generate("a red fox", images=["ref.png"], seed=7)

`Flux2Client` is synchronous over gRPC or HTTP (binary tensors on HTTP, never JSON arrays of
pixels); `AsyncFlux2Client` uses `tritonclient.grpc.aio` for many concurrent callers in one
event loop. Both return PIL images. Server-side rejections raise `Flux2Error` whose message is
the server's one line naming the field at fault.
"""

from __future__ import annotations

import io
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from flux2_serving.contract.interface import PUBLIC_INPUTS, GenerationOptions
from flux2_serving.contract.names import BLS_MODEL as MODEL
from flux2_serving.contract.names import OVERLOADED_MARKS, ROUTING_HEADER
from flux2_serving.contract.reference_key import encoded_reference_key

DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# ROUTING_HEADER (HTTP header / gRPC metadata key) for gateways in front of several replicas: the
# sha256 of the request's encoded references, the BLS's own first-level cache key. A gateway that
# hashes on it (deploy/nginx/flux2-gateway.conf) sends every edit of one reference set to one
# replica, whose reference K/V cache then holds it. Absent for text-to-image.


def public_inputs():
    """The served model's public inputs, as its BLS declares them (contract/interface.py)."""
    return PUBLIC_INPUTS


def _scalar_types() -> dict:
    """name -> (numpy type, Triton wire type) of the scalar inputs, from the served model's declaration."""
    from tritonclient.utils import triton_to_np_dtype

    return {f.name: (triton_to_np_dtype(f.datatype), f.datatype) for f in public_inputs() if f.datatype != "BYTES"}


SCALAR_TYPES = _scalar_types()


class Flux2Error(RuntimeError):
    """The server refused or failed a request; `status` is Triton's code (e.g. INVALID_ARGUMENT / 400)."""

    def __init__(self, message: str, status: str | None = None):
        super().__init__(message)
        self.status = status


def encode_image(image) -> bytes:
    """Encoded image bytes from a path, raw bytes (sent as they are) or a PIL image (PNG)."""
    if isinstance(image, (bytes, bytearray)):
        return bytes(image)
    if isinstance(image, (str, Path)):
        return Path(image).read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def request_tensors(prompt: str | None, images=(), **scalars) -> dict[str, tuple[np.ndarray, str]]:
    """name -> (array, Triton dtype) for one request; scalars left as None are not sent."""
    tensors = {}
    if prompt is not None:
        tensors["prompt"] = (np.array([prompt.encode()], dtype=np.object_), "BYTES")
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


UNAVAILABLE = ("UNAVAILABLE", "502", "503", "504")  # gRPC status, or HTTP status from a gateway
UNAVAILABLE_HINT = (" (unavailable: the server, or the replica a gateway sent this request to, went away while the "
                    "request was in flight or could not be reached; it can be sent again)")
# Triton's answers when the BLS's bounded queue refuses a request, and the BLS's when a component's is full.
OVERLOADED_HINT = (" (overloaded: a queue of the server was full, or the request waited its queue timeout; it was "
                   "not completed: send it again later, or to another replica)")


def _error(exc) -> Flux2Error:
    status = exc.status() if hasattr(exc, "status") else None
    message = " ".join(str(exc.message() if hasattr(exc, "message") else exc).split())
    if any(text in message for text in OVERLOADED_MARKS):
        return Flux2Error(message + OVERLOADED_HINT, None if status is None else str(status))
    if (status is not None and any(code in str(status) for code in UNAVAILABLE)) or "RST_STREAM" in message:
        if "<html" in message:  # a gateway's error page, not Triton's JSON
            message = f"HTTP {status} from the gateway"
        message += UNAVAILABLE_HINT
    return Flux2Error(message, None if status is None else str(status))


def _arguments(prompt, images, options: dict) -> dict:
    """The request's tensors; `options` are GenerationOptions' fields (diffusers' names), unknown ones refused."""
    return request_tensors(prompt, images, **asdict(GenerationOptions(**options)))


def _timeouts(protocol: str, timeout_s: float | None) -> dict:
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
        options = {"network_timeout": timeout_s, "connection_timeout": timeout_s} if protocol == "http" and timeout_s else {}
        self.url = url or DEFAULT_URLS[protocol]
        self.client = module.InferenceServerClient(self.url, **options)

    def infer(self, tensors: dict, outputs=("images",)):
        """The raw tritonclient result for prepared `request_tensors`."""
        from tritonclient.utils import InferenceServerException

        try:
            return self.client.infer(self.model, infer_inputs(self.module, tensors),
                                     outputs=requested_outputs(self.module, outputs),
                                     headers=routing_headers(tensors) or None, **_timeouts(self.protocol, self.timeout_s))
        except InferenceServerException as exc:
            raise _error(exc) from None
        except OSError as exc:  # HTTP: refused, reset or timed out (gRPC reports these as above)
            raise Flux2Error(f"{self.url}: {type(exc).__name__}: {exc}{UNAVAILABLE_HINT}", "UNAVAILABLE") from None

    def generate(self, prompt: str, images=(), **options) -> list[Image.Image]:
        """Text-to-image without `images`; an edit with 1-4 reference images (paths, bytes or PIL).
        `options`: GenerationOptions' fields, diffusers' names (height, width, seed, num_images_per_prompt,
        num_inference_steps, reuse_reference_cache); left out, the server's defaults."""
        return to_pil(self.infer(_arguments(prompt, images, options)))

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
        self.client = aio.InferenceServerClient(url or DEFAULT_URLS["grpc"])

    async def generate(self, prompt: str, images=(), **options) -> list[Image.Image]:
        """As Flux2Client.generate."""
        from tritonclient.utils import InferenceServerException

        tensors = _arguments(prompt, images, options)
        try:
            result = await self.client.infer(self.model, infer_inputs(self.module, tensors),
                                             outputs=requested_outputs(self.module),
                                             headers=routing_headers(tensors) or None, **_timeouts("grpc", self.timeout_s))
        except InferenceServerException as exc:
            raise _error(exc) from None
        return to_pil(result)

    async def close(self):
        await self.client.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
