"""python -m flux2_serving.server.gate: the validating front door of the embedded tritonserver.

The tritonserver 2.51 that `make serve`, the demo and the tests run (from the nvidia-pytriton wheel)
can be taken down by one request: a 400 KB JSON body of nested brackets crashes it (its JSON parser
recurses without a limit), a 1 MB gzip body makes it inflate a 1 GiB prompt, a compressed gRPC
message is inflated to any size, and an uncompressed body of any size is taken in whole before a
model sees it. Newer releases have limits of their own (docs/security.md); this one cannot be
changed, so the launcher puts this process on the public HTTP and gRPC ports and tritonserver on
loopback ports behind it. Per request it checks, before tritonserver sees a byte:

HTTP  Content-Length present (411) and at most --max-request-bytes (413), no Content-Encoding (415),
      at most --max-receiving-bytes of bodies being received at once (503 + Retry-After), the JSON
      part parsed here: valid JSON, UTF-8, at most 1 MiB and 32 levels deep; an inference request
      checked against the KServe v2 schema (kserve_json.py: 400 naming the field); Triton's
      `generate` endpoints (not served by this product) 404.
gRPC  messages at most --max-request-bytes after decompression (RESOURCE_EXHAUSTED), at most
      --max-grpc-calls calls at once (RESOURCE_EXHAUSTED), only Triton's inference service and the
      gRPC health service.

Everything else passes through unchanged (headers, the admin key, deadlines, metadata, streams,
errors), and tritonserver's answers come back as they are, but for two that a caller should retry:
when tritonserver does not answer (it is being restarted), 503 / UNAVAILABLE "retry in a few seconds"
(never the internal address); when a request reached a Python-backend process that had died (Triton
2.51's INTERNAL "Stub process ... is not healthy": the launcher's supervisor is replacing it), the same
message as 503 / UNAVAILABLE with Retry-After, so that every client, not only ours, knows to retry.
aiohttp (HTTP) and grpcio's asyncio server (gRPC) share one event loop: both come with tritonclient.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import signal
import sys

import aiohttp
import grpc
from aiohttp import web

from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.heap import keep_freed_memory
from flux2_serving.contract.names import DEAD_PROCESS, PROCESS_REPLACED
from flux2_serving.server import kserve_json

MAX_JSON_BYTES = 2**20  # the JSON part of a request: tensors travel in Triton's binary extension
MAX_GRPC_CALLS = 32
BODY_TIMEOUT_S = 60  # a body that does not arrive within this is dropped (slow senders hold memory)
RETRY_AFTER_S = 2
RECONNECT_WAIT_S = 5  # a unary call that found tritonserver unreachable waits this long for it, then is sent again
# An idle connection to tritonserver's HTTP port is closed after this (aiohttp's default: 15 s). On SIGTERM
# tritonserver 2.51 first waits for its HTTP connections to close, out of the same --exit-timeout-secs as
# its models: one idle keep-alive from here used it all up, and it then exited without unloading a model
# ("Exit timeout expired. Exiting immediately."), so no model's finalize() ran and its Python-backend
# processes were killed (issue 28).
UPSTREAM_KEEPALIVE_S = 1.0
RESTARTING = "the server is not answering (it may be restarting): retry in a few seconds"
HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
              "transfer-encoding", "upgrade", "host", "content-length"}
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
GENERATE_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/generate(_stream)?$")
GRPC_SERVICES = ("/inference.GRPCInferenceService/", "/grpc.health.v1.Health/")
STREAM_METHODS = ("/inference.GRPCInferenceService/ModelStreamInfer",)


def default_max_request_bytes() -> int:
    """The envelope's whole-request bound (contract/envelope.py max_request_bytes)."""
    return DEFAULT_ENVELOPE.max_request_bytes


def _error_text(body: str) -> str:
    """The message of Triton's {"error": ...} body (the body itself if it is not one)."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return body[:500]


def refusal(status: int, message: str, retry: bool = False) -> web.Response:
    """Triton's own error shape ({"error": ...}), which tritonclient reports as the message."""
    headers = {"Retry-After": str(RETRY_AFTER_S)} if retry else None
    return web.json_response({"error": message}, status=status, headers=headers)


class HttpGate:
    """The HTTP half: check, then forward to tritonserver's HTTP port `upstream` (host:port)."""

    def __init__(self, upstream: str, max_request_bytes: int, max_receiving_bytes: int):
        self.upstream = f"http://{upstream}"
        self.max_request_bytes, self.max_receiving_bytes = max_request_bytes, max_receiving_bytes
        self.receiving = 0  # bytes of bodies being received now
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.session is None:  # made inside the running loop
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=UPSTREAM_KEEPALIVE_S)
            self.session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None),
                                                 connector=connector)
        if GENERATE_PATH.match(request.path):
            return refusal(404, "the generate endpoints are not served here: use /infer")
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            return refusal(415, f"Content-Encoding '{encoding[:40]}' is not accepted: send the body uncompressed "
                                f"(at most {self.max_request_bytes} bytes)")
        if "chunked" in request.headers.get("Transfer-Encoding", "").lower():  # size unknown until received
            return refusal(411, "a request body needs a Content-Length header (chunked bodies are not accepted)")
        length = request.content_length or 0
        if length > self.max_request_bytes:
            return refusal(413, f"the request body is {length} bytes; at most {self.max_request_bytes} bytes allowed")
        if self.receiving + length > self.max_receiving_bytes:
            return refusal(503, "too many request bodies are being received at once: retry in a few seconds",
                           retry=True)
        if request.headers.get("Expect", "").lower() == "100-continue":  # curl asks for bodies over 1 MiB
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # as aiohttp's own expect_handler
        self.receiving += length
        try:
            body = await asyncio.wait_for(request.content.readexactly(length), BODY_TIMEOUT_S) if length else b""
        except (TimeoutError, asyncio.IncompleteReadError):
            return refusal(400, f"the request body did not arrive in full within {BODY_TIMEOUT_S} s")
        finally:
            self.receiving -= length
        problem = self.check_json(request, body)
        if problem:
            return refusal(400, problem)
        parcel = [body]
        del body  # forward() lets go of it once tritonserver has it
        return await self.forward(request, parcel)

    def check_json(self, request: web.BaseRequest, body: bytes) -> str | None:
        """Why the body's JSON part is refused, or None. With Triton's binary extension the JSON is the
        first Inference-Header-Content-Length bytes; otherwise the whole body."""
        if not body:
            return None
        header = request.headers.get("Inference-Header-Content-Length")
        if header is not None:
            if not header.isdigit() or int(header) > len(body):
                return (f"Inference-Header-Content-Length must be an integer in [0, {len(body)}] (the body's size), "
                        f"got {header[:20]!r}")
            json_bytes = int(header)
        else:
            json_bytes = len(body)
        if json_bytes > MAX_JSON_BYTES:
            return (f"the JSON part of the request is {json_bytes} bytes; at most {MAX_JSON_BYTES} allowed (send "
                    "tensors as binary data: Triton's binary tensor extension, as tritonclient does)")
        try:
            document = kserve_json.parse(body[:json_bytes], "JSON part of the request")
            if request.method == "POST" and INFER_PATH.match(request.path):
                kserve_json.check_infer(document, len(body) - json_bytes)
        except kserve_json.BadJson as exc:
            return str(exc)
        return None

    async def forward(self, request: web.BaseRequest, parcel: list) -> web.StreamResponse:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        try:
            async with self.session.request(request.method, self.upstream + request.rel_url.raw_path_qs,
                                            headers=headers, data=parcel.pop() or None) as upstream:
                if upstream.status == 500 and upstream.content_length and upstream.content_length < 2**16:
                    text = (await upstream.read()).decode(errors="replace")
                    if DEAD_PROCESS in text:  # Triton's INTERNAL for a request that reached a dead stub
                        return refusal(503, f"{_error_text(text)} {PROCESS_REPLACED}", retry=True)
                    return web.Response(status=500, body=text.encode(), content_type="application/json")
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP:
                        response.headers.add(key, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_chunked(2**20):
                    await response.write(chunk)
                await response.write_eof()
                return response
        except aiohttp.ClientConnectionError:
            return refusal(503, RESTARTING, retry=True)


class GrpcGate(grpc.GenericRpcHandler):
    """The gRPC half: every call of the allowed services forwarded as raw bytes (nothing is parsed
    here; grpcio enforces the message bound after decompression) to tritonserver's gRPC port."""

    def __init__(self, upstream: str, max_request_bytes: int):
        # Reconnect within a second once tritonserver is back (gRPC's default backoff grows to minutes).
        self.channel = grpc.aio.insecure_channel(upstream, options=[
            ("grpc.max_send_message_length", max_request_bytes), ("grpc.max_receive_message_length", -1),
            ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 1000)])
        self.handlers = {}

    def service(self, details):
        method = details.method
        if not method.startswith(GRPC_SERVICES):
            return None  # UNIMPLEMENTED
        if method not in self.handlers:
            if method in STREAM_METHODS:
                # partial keeps the coroutine/async-generator flags that grpc.aio dispatches on
                self.handlers[method] = grpc.stream_stream_rpc_method_handler(
                    functools.partial(self._stream, self.channel.stream_stream(method)))
            else:
                self.handlers[method] = grpc.unary_unary_rpc_method_handler(
                    functools.partial(self._unary, self.channel.unary_unary(method)))
        return self.handlers[method]

    @staticmethod
    def _call_options(context) -> dict:
        metadata = tuple((key, value) for key, value in context.invocation_metadata()
                         if not key.startswith((":", "grpc-")) and key not in ("user-agent", "content-type", "te"))
        return {"metadata": metadata, "timeout": context.time_remaining()}

    async def _unary(self, call, request: bytes, context):
        for attempt in range(2):
            try:
                return await call(request, **self._call_options(context))
            except grpc.aio.AioRpcError as error:
                # Not connected (tritonserver restarting, or the channel still backing off after it came
                # back): the request never reached it, so it is sent once more when the channel is ready.
                if attempt == 0 and _unreachable(error) and await self._connected(RECONNECT_WAIT_S):
                    continue
                await self._abort(error, context)

    async def _connected(self, seconds: float) -> bool:
        """Whether the channel to tritonserver is ready within `seconds` (trying to connect meanwhile)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        state = self.channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.READY:
            if loop.time() >= deadline:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.channel.wait_for_state_change(state), deadline - loop.time())
            state = self.channel.get_state(try_to_connect=True)
        return True

    async def _stream(self, call, requests, context):
        try:
            async for response in call(requests, **self._call_options(context)):
                yield response
        except grpc.aio.AioRpcError as error:
            await self._abort(error, context)

    @staticmethod
    async def _abort(error: grpc.aio.AioRpcError, context) -> None:
        code, details = error.code(), error.details() or ""
        if _unreachable(error):
            details = RESTARTING  # the channel's own error names the internal address
        elif code == grpc.StatusCode.INTERNAL and DEAD_PROCESS in details:  # the request never ran: retryable
            code, details = grpc.StatusCode.UNAVAILABLE, f"{details} {PROCESS_REPLACED}"
        await context.abort(code, details)


def _unreachable(error: grpc.aio.AioRpcError) -> bool:
    """gRPC's own UNAVAILABLE for a channel that could not connect (its text names the internal address)."""
    details = (error.details() or "").lower()
    return error.code() == grpc.StatusCode.UNAVAILABLE and ("connect" in details or "127.0.0.1" in details)


async def serve(http_listen: tuple[str, int], grpc_listen: tuple[str, int], http_upstream: str, grpc_upstream: str,
                max_request_bytes: int, max_receiving_bytes: int, max_grpc_calls: int, stop: asyncio.Event) -> None:
    gate = HttpGate(http_upstream, max_request_bytes, max_receiving_bytes)
    runner = web.ServerRunner(web.Server(gate.handle, handler_cancellation=True, auto_decompress=False))
    await runner.setup()
    await web.TCPSite(runner, *http_listen).start()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_request_bytes),
                                      ("grpc.max_send_message_length", -1)],
                             maximum_concurrent_rpcs=max_grpc_calls)
    server.add_generic_rpc_handlers((GrpcGate(grpc_upstream, max_request_bytes),))
    host, port = grpc_listen
    if server.add_insecure_port(f"[{host}]:{port}" if ":" in host else f"{host}:{port}") == 0:
        raise OSError(f"cannot listen on {host}:{port} (gRPC)")
    await server.start()
    print(f"gate ready: HTTP {http_listen[1]} -> {http_upstream}, gRPC {port} -> {grpc_upstream}", flush=True)
    await stop.wait()
    await server.stop(1)
    await runner.cleanup()
    if gate.session is not None:
        await gate.session.close()


def _listen(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.server.gate", __doc__)
    parser.add_argument("--http-listen", required=True, metavar="HOST:PORT", help="public HTTP address")
    parser.add_argument("--grpc-listen", required=True, metavar="HOST:PORT", help="public gRPC address")
    parser.add_argument("--http-upstream", required=True, metavar="HOST:PORT", help="tritonserver's HTTP address")
    parser.add_argument("--grpc-upstream", required=True, metavar="HOST:PORT", help="tritonserver's gRPC address")
    parser.add_argument("--max-request-bytes", type=int, default=default_max_request_bytes(),
                        help="largest HTTP body or gRPC message (default %(default)s: the envelope's "
                             "max_request_bytes)")
    parser.add_argument("--max-receiving-bytes", type=int, default=None,
                        help="HTTP bodies being received at once, in bytes (default: 4 x --max-request-bytes)")
    parser.add_argument("--max-grpc-calls", type=int, default=MAX_GRPC_CALLS,
                        help="gRPC calls in flight at once (default %(default)s)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # every image response passes through here: no page faults per response (contract/heap.py)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve(_listen(args.http_listen), _listen(args.grpc_listen), args.http_upstream, args.grpc_upstream,
                    args.max_request_bytes, args.max_receiving_bytes or 4 * args.max_request_bytes,
                    args.max_grpc_calls, stop)

    try:
        asyncio.run(run())
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
