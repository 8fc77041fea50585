"""The OpenAI Images API (generations, edits, models) in front of `flux2_klein_kv` on Triton.

    from flux2_serving.front.app import FrontSettings, create_app
    app = create_app(FrontSettings("127.0.0.1:8001"))   # an ASGI app: python -m flux2_serving.front runs it

Starlette rather than FastAPI: every answer here must be OpenAI's error shape with `param` naming
the OpenAI field, and OpenAI's request bodies are validated field by field with the model's own
rules (fields.py); FastAPI's value is declaring bodies as pydantic models, whose 422 answers would
all have to be caught and rewritten, and its dependency injection and generated schema would add a
layer to an app of five routes. Starlette gives the raw ASGI request, so the body limit is enforced
before any parser runs (body.py), and it needs only python-multipart for the edits' forms.

The front holds no model and no GPU: it translates, so it scales apart from the Triton replicas
(one asyncio gRPC client per process, triton.py) and may run next to a gateway that routes edits by
their references (it sends the same routing header as the Python client).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from tritonclient.utils import InferenceServerException

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE

from .body import json_object, multipart_form
from .errors import ApiError, from_triton, invalid, unavailable
from .fields import ImageRequest, image_request
from .metrics import FrontMetrics
from .middleware import FrontMiddleware, error_response
from .response import MEDIA_TYPES, images_response
from .store import ImageStore
from .triton import Triton

log = logging.getLogger("flux2_serving.front")
LIMITS = DEFAULT_ENVELOPE.request_limits()
DEFAULT_MODEL_ID = "flux2-klein-9b-kv"
# A generation's JSON holds a prompt (the BLS allows 16 KiB) and a few numbers: 1 MiB is plenty.
JSON_BODY_BYTES = 1 << 20
DEFAULT_MAX_BODY_BYTES = 64 << 20
REFERENCE_FILES = ("image", "image[]")


@dataclass(frozen=True)
class FrontSettings:
    """triton_grpc_url: Triton's gRPC host:port. model_id: the name callers use (GET /v1/models).
    api_keys: Bearer keys accepted on /v1/* (empty: no authentication). max_body_bytes: the largest
    edit body (generations: at most JSON_BODY_BYTES). max_image_bytes: one reference's (the BLS's
    own limit by default). url_base: the address callers reach this front at, for
    response_format=url (None: url is refused). timeout_s: a generation's deadline, in Triton too."""

    triton_grpc_url: str
    model_id: str = DEFAULT_MODEL_ID
    api_keys: frozenset = field(default_factory=frozenset)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_image_bytes: int = LIMITS["max_reference_bytes"]
    url_base: str | None = None
    timeout_s: float | None = 300.0

    def __post_init__(self):
        object.__setattr__(self, "api_keys", frozenset(key for key in self.api_keys if key))
        for name in ("max_body_bytes", "max_image_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive (or None), got {self.timeout_s}")
        if self.url_base is not None and not self.url_base.startswith(("http://", "https://")):
            raise ValueError(f"url_base must be an http:// or https:// address, got {self.url_base!r}")


def _references(fields: dict, files: dict) -> list[bytes]:
    """The edit's reference files in order, from `image` or `image[]` (the openai client sends one
    file as `image`, a list as `image[]`)."""
    if "mask" in files or "mask" in fields:
        raise invalid("mask", "'mask' is not supported: this model edits the whole picture as the prompt says; "
                              "send the edit without a mask", "unsupported_value")
    for name in REFERENCE_FILES:
        if name in fields:
            raise invalid("image", f"'{name}' must be a file part of the form (an encoded PNG/JPEG/WebP image)")
    for name in files:
        if name not in REFERENCE_FILES:
            raise invalid(name, f"unknown file '{name}'; references are sent as 'image' or 'image[]'",
                          "unknown_parameter")
    if len(files) > 1:
        raise invalid("image", "send the references as 'image' or as 'image[]', not both")
    return next(iter(files.values()), [])


class CallerGone(Exception):
    """The caller closed the connection before its answer was ready."""


CLIENT_CLOSED = 499  # nginx's status for it: in the metrics and the log line, never sent (nobody listens)


async def _unless_disconnected(request, work):
    """`work`'s result; if the caller disconnects first, `work` is cancelled (a gRPC call's cancellation
    reaches Triton, which drops the request from its queue or stops it at the BLS's next step) and
    CallerGone raised. The body has been read, so the server's next ASGI message is the disconnect."""
    task = asyncio.ensure_future(work)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let the cancellation reach the call
    if task.cancelled():
        raise CallerGone
    return task.result()


def create_app(settings: FrontSettings) -> Starlette:
    metrics = FrontMetrics()
    triton = Triton(settings.triton_grpc_url, settings.timeout_s, metrics.triton_seconds)
    store = ImageStore(settings.url_base) if settings.url_base else None
    started = int(time.time())
    model = {"id": settings.model_id, "object": "model", "created": started, "owned_by": "flux2-serving"}

    @asynccontextmanager
    async def lifespan(app):
        await triton.start()
        try:
            yield
        finally:
            await triton.close()

    def _parsed(values: dict, references=(), edit: bool = False) -> ImageRequest:
        return image_request(values, references, model_id=settings.model_id, form=edit, edit=edit,
                             url_base=settings.url_base, max_references=LIMITS["max_references"],
                             max_image_bytes=settings.max_image_bytes)

    async def _answer(request, image: ImageRequest) -> JSONResponse:
        request_id = request.state.request_id
        if image.user:
            request.state.user = image.user
        try:
            result = await _unless_disconnected(request, triton.infer(image, request_id))
        except CallerGone:
            log.info("%s the caller went away: its Triton request is cancelled", request_id)
            return Response(status_code=CLIENT_CLOSED)
        except InferenceServerException as exc:
            error = from_triton(exc, request_id)
            if error.status >= 500:  # the caller's answer says neither where Triton is nor what gRPC said: here
                log.warning("%s Triton at %s answered %s: %s", request_id, settings.triton_grpc_url, exc.status(),
                            " ".join(str(exc.message()).split()))
            raise error from None
        urls = None
        if image.response_format == "url":
            extension, media_type = image.output_format, MEDIA_TYPES[image.output_format]

            def urls(images):
                return [store.put(data, extension, media_type) for data in images]

        body = await asyncio.to_thread(images_response, result, image.output_format, image.compression, urls)
        return JSONResponse(body)

    async def generations(request):
        values = await json_object(request, min(settings.max_body_bytes, JSON_BODY_BYTES))
        return await _answer(request, _parsed(values))

    async def edits(request):
        fields, files = await multipart_form(request, settings.max_body_bytes, LIMITS["max_references"] + 2)
        return await _answer(request, _parsed(fields, _references(fields, files), edit=True))

    async def models(request):
        return JSONResponse({"object": "list", "data": [model]})

    async def one_model(request):
        if request.path_params["model"] != settings.model_id:
            raise ApiError(404, f"model {request.path_params['model']!r} does not exist here; this server serves "
                                f"{settings.model_id!r}", param="model", code="model_not_found")
        return JSONResponse(model)

    async def image_file(request):
        found = store.get(request.path_params["name"]) if store else None
        if found is None:
            raise ApiError(404, "no such image (URLs are valid for an hour)", code="not_found")
        return Response(found[0], media_type=found[1], headers={"Cache-Control": "private, max-age=3600"})

    async def health(request):
        return JSONResponse({"status": "live"})

    async def ready(request):
        problem = await triton.readiness()
        if problem:
            raise unavailable(problem)
        return JSONResponse({"status": "ready"})

    async def prometheus(request):
        return Response(metrics.exposition(), media_type=metrics.content_type)

    async def api_error(request, exc: ApiError):
        return error_response(exc)

    async def http_error(request, exc: HTTPException):
        code = "not_found" if exc.status_code == 404 else None
        message = (f"no such endpoint: {request.method} {request.url.path}" if exc.status_code == 404
                   else f"{request.method} {request.url.path}: {exc.detail}")
        return error_response(ApiError(exc.status_code, message, code=code, headers=exc.headers))

    routes = [
        Route("/v1/images/generations", generations, methods=["POST"]),
        Route("/v1/images/edits", edits, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{model:path}", one_model, methods=["GET"]),
        Route("/v1/images/files/{name}", image_file, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/health/ready", ready, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[Middleware(FrontMiddleware, api_keys=settings.api_keys, metrics=metrics)],
                     exception_handlers={ApiError: api_error, HTTPException: http_error})
