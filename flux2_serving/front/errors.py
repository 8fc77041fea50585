"""Errors in OpenAI's shape, and Triton's answers mapped onto them.

Every error the front answers, its own or Triton's, is `{"error": {"message", "type", "param",
"code"}}` with the HTTP status the official `openai` client turns into its exception classes
(400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 413, 429 RateLimitError, 5xx
InternalServerError). A caller's mistake is always a 4xx naming the OpenAI field at fault; 500 is
kept for what the caller cannot fix, with a request id to quote and nothing of the server's inside.
Neither do 503 and 504 quote Triton's address or gRPC's own text (they name hosts and ports of the
cluster): the caller gets what happened and when to come back, the front's log gets the details.
"""

from __future__ import annotations

import re

from flux2_serving.contract.names import OVERLOADED_MARKS, SHUTTING_DOWN

RETRY_AFTER_S = 2  # what a 429 or 503 tells the caller to wait (Triton's queue drains in seconds)

# Triton's (the BLS's) field names -> the OpenAI parameter a caller sent them as.
OPENAI_PARAM = {"height": "size", "width": "size", "num_images_per_prompt": "n", "image": "image",
                "prompt": "prompt", "seed": "seed", "num_inference_steps": "num_inference_steps",
                "reuse_reference_cache": "reuse_reference_cache"}
_QUOTED_FIELD = re.compile(r"'(\w+)(\[\d+\])?'")


class ApiError(Exception):
    """An answer in OpenAI's error shape: raise it anywhere below an endpoint."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 and status != 429
                             else "rate_limit_error" if status == 429 else "server_error")
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def shown(value) -> str:
    """A value as a message quotes it: JSON's true/false, a string in quotes, at most 40 characters."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    """400 for the field `param`; `message` names the field and the limit."""
    return ApiError(400, message, param=param, code=code)


def unsupported(param: str, value, accepted: str) -> ApiError:
    """400 for an OpenAI field this model cannot honour at `value` (never ignored silently)."""
    return invalid(param, f"'{param}' {shown(value)} is not supported by this server; {accepted}", "unsupported_value")


def server_error(request_id: str) -> ApiError:
    return ApiError(500, f"the server failed this request; quote request id {request_id} to its operators",
                    code="server_error")


def unavailable(message: str) -> ApiError:
    """503 with Retry-After: nothing the caller did, the same request can be sent again."""
    return ApiError(503, message, code="service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


def from_triton(exc, request_id: str) -> ApiError:
    """The answer for a tritonclient InferenceServerException from the BLS (gRPC). The caller of this
    function logs the exception of a 5xx."""
    status = str(exc.status() or "")
    message = " ".join(str(exc.message() or "").split())
    if any(mark in message for mark in OVERLOADED_MARKS):  # Triton's full queue or queue timeout, the BLS's own
        return ApiError(429, f"the server is overloaded ({message}); send the request again later",
                        code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)})
    if "INVALID_ARGUMENT" in status and "unexpected inference output" not in message:  # (that: a stale repository)
        return _invalid_argument(message)
    if "DEADLINE_EXCEEDED" in status:
        return ApiError(504, "the request did not finish within the front's timeout; send it again, or with "
                             "fewer steps or images", code="timeout")
    if "UNAVAILABLE" in status or SHUTTING_DOWN in message or "NOT_FOUND" in status:
        # unreachable, stopping, or the model not loaded: nothing the caller did; it can be sent again
        return unavailable(f"the inference server is unavailable (unreachable, starting or stopping); send the "
                           f"request again in {RETRY_AFTER_S} s (request id {request_id})")
    return server_error(request_id)  # INTERNAL and anything else


def _invalid_argument(message: str) -> ApiError:
    """Triton's one-line INVALID_ARG names the field in quotes ('height' is 260; ...): the same message
    with the field's OpenAI name, and `param` set to it."""
    match = _QUOTED_FIELD.search(message)
    field = match.group(1) if match else None
    param = OPENAI_PARAM.get(field) if field else None
    if field in ("height", "width"):
        message = _QUOTED_FIELD.sub(lambda m: f"'size' (its {m.group(1)})" if m.group(1) == field else m.group(0),
                                    message)
    elif field == "num_images_per_prompt":
        message = message.replace("'num_images_per_prompt'", "'n' (images per prompt)")
    return invalid(param, message)
