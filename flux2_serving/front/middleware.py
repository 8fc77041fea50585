"""What every request goes through: a request id, the API key, metrics, one log line, and no bare 500.

A plain ASGI middleware (not Starlette's BaseHTTPMiddleware, which buffers responses in a task of
its own) that sits outside the routes, so it sees every request, unknown paths included:
- the caller's `x-request-id` is kept when it is a sane token (a hostile one could forge log lines),
  else a new one is made; every response carries it, and the endpoints pass it to Triton;
- /v1/* needs `Authorization: Bearer <key>` when keys are configured (compared in constant time),
  except the image files of url mode, whose unguessable names are their capability;
- one log line per request: id, method, path, status, seconds (and the OpenAI `user` if sent);
- anything unexpected becomes OpenAI's 500 `server_error` naming the request id; the traceback
  goes to the log, never to the caller.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid

from starlette.responses import Response

from .errors import ApiError, server_error
from .metrics import FrontMetrics, endpoint_of

log = logging.getLogger("flux2_serving.front")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
OPEN_PATHS = ("/v1/images/files/",)


def error_response(error: ApiError) -> Response:
    """The error as JSON in ASCII (\\u escapes): a message or `param` may quote what the caller sent,
    lone surrogates included, which have no UTF-8 bytes (JSONResponse's encoding would turn the 400
    into a 500)."""
    body = json.dumps(error.body(), separators=(",", ":")).encode("ascii")
    return Response(body, error.status, headers=error.headers, media_type="application/json")


def _header(scope, name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in scope["headers"] if key == name), None)


class FrontMiddleware:
    def __init__(self, app, api_keys: frozenset, metrics: FrontMetrics):
        self.app, self.metrics = app, metrics
        self.keys = [key.encode() for key in api_keys]

    def _denied(self, scope) -> ApiError | None:
        path = scope["path"]
        if not self.keys or not path.startswith("/v1/") or path.startswith(OPEN_PATHS):
            return None
        scheme, _, token = (_header(scope, b"authorization") or "").partition(" ")
        token = token.strip().encode("latin-1")
        if scheme.lower() == "bearer" and token and any(hmac.compare_digest(token, key) for key in self.keys):
            return None
        said = "no API key was given" if not token else "the API key is not valid"
        return ApiError(401, f"{said}: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                        headers={"WWW-Authenticate": "Bearer"})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        sent = _header(scope, b"x-request-id")
        request_id = sent if sent and _REQUEST_ID.fullmatch(sent) else uuid.uuid4().hex
        state = {**scope.get("state", {}), "request_id": request_id}
        scope["state"] = state
        endpoint, status, started = endpoint_of(scope["path"]), None, time.monotonic()

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                   (b"x-request-id", request_id.encode())]}
            await send(message)

        self.metrics.in_flight.inc()
        try:
            denied = self._denied(scope)
            if denied:
                await error_response(denied)(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("%s failed", request_id)
            if status is None:
                await error_response(server_error(request_id))(scope, receive, send_with_id)
        finally:
            seconds = time.monotonic() - started
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(endpoint, str(status or 500)).inc()
            self.metrics.seconds.labels(endpoint).observe(seconds)
            user = f" user={state['user'][:64]!r}" if state.get("user") else ""
            path = scope["path"][:200].encode("unicode_escape").decode("ascii")  # no forged log lines
            log.info("%s %s %s %s %.3fs%s", request_id, scope["method"], path, status or 500, seconds, user)
