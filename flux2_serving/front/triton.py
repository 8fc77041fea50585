"""The front's one Triton connection: an asyncio gRPC client per process, made on startup.

gRPC because its binary tensors carry references and images without JSON, its deadline cancels a
request on the server when the front gives up, and one channel multiplexes every concurrent call of
the event loop. The tensors, the routing header and the outputs are built by the Python client's
own functions (clients/api.py), so a request through the front is byte for byte the request the
Python client sends: the same images for the same seed, and the same reference key for a gateway's
affinity routing.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

import tritonclient.grpc as grpc_module
import tritonclient.grpc.aio as aio
from tritonclient.utils import InferenceServerException

from flux2_serving.clients.api import (
    infer_inputs,
    request_tensors,
    requested_outputs,
    routing_headers,
    timeout_arguments,
)
from flux2_serving.contract.interface import DEFAULT_OUTPUTS
from flux2_serving.contract.names import BLS_MODEL

from .fields import ImageRequest

log = logging.getLogger("flux2_serving.front")
READY_TIMEOUT_S = 3.0


def call_arguments(request: ImageRequest, request_id: str, timeout_s: float | None) -> dict:
    """infer()'s keyword arguments for `request`: inputs, outputs (the BLS's PNGs for png, which the
    front passes on as they are; the pixels for jpeg/webp, which it encodes), the routing header,
    Triton's request id (its logs and traces then name the front's), and the deadline: Triton's
    `timeout` parameter (microseconds; it bounds the queue wait and the BLS's steps) and the gRPC one."""
    tensors = request_tensors(request.prompt, request.references, **asdict(request.options))
    names = ("png", "seed", "notes") if request.output_format == "png" else DEFAULT_OUTPUTS
    arguments = {"model_name": BLS_MODEL, "inputs": infer_inputs(grpc_module, tensors),
                 "outputs": requested_outputs(grpc_module, names), "request_id": request_id,
                 "headers": routing_headers(tensors) or None}
    return {**arguments, **timeout_arguments("grpc", timeout_s)}


class Triton:
    """The asyncio gRPC client of one front process; `seconds` observes each call's duration."""

    def __init__(self, url: str, timeout_s: float | None, seconds=None):
        self.url, self.timeout_s, self.seconds = url, timeout_s, seconds
        self.client = None
        self.last_problem = None  # what readiness() last logged

    async def start(self) -> None:
        self.client = aio.InferenceServerClient(self.url)  # lazy: connects on the first call

    async def close(self) -> None:
        if self.client is not None:
            await self.client.close()

    async def infer(self, request: ImageRequest, request_id: str):
        """The tritonclient result; InferenceServerException as Triton raised it."""
        started, outcome = time.monotonic(), "error"
        try:
            result = await self.client.infer(**call_arguments(request, request_id, self.timeout_s))
            outcome = "ok"
            return result
        finally:
            if self.seconds is not None:
                self.seconds.labels(outcome).observe(time.monotonic() - started)

    async def readiness(self) -> str | None:
        """None when Triton and the model are ready, else the one line saying what is not, for the
        caller: without Triton's address or gRPC's text, which go to the log (once per change, since
        anyone may poll /health/ready)."""
        detail = public = None
        try:
            if not await self.client.is_server_ready(client_timeout=READY_TIMEOUT_S):
                detail = public = "the inference server is not ready"
            elif not await self.client.is_model_ready(BLS_MODEL, client_timeout=READY_TIMEOUT_S):
                detail = public = "the model is not ready on the inference server"
        except InferenceServerException as exc:
            public = "the inference server does not answer"
            detail = f"{public}: {exc.status()}: {' '.join(str(exc.message()).split())}"
        if detail != self.last_problem:
            self.last_problem = detail
            (log.warning if detail else log.info)("readiness: Triton at %s: %s", self.url, detail or "ready")
        return public
