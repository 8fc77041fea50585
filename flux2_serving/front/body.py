"""Request bodies read with a byte limit before anything parses them.

Callers are assumed hostile: a declared Content-Length over the limit is refused before a byte is
read, and a body without one (chunked) is counted while it arrives and refused as soon as it passes
the limit, so neither the JSON parser nor the multipart parser ever sees more than the limit. JSON
objects with a repeated key are refused rather than keeping the last value silently, and so are
repeated form fields.
"""

from __future__ import annotations

import json

from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from .errors import ApiError, invalid

FORM_FIELDS = 64  # text fields of an edit: the OpenAI fields and the extras are fewer than 30
FORM_FIELD_BYTES = 1 << 20  # one text field (the prompt: the BLS allows 16 KiB of UTF-8)


def too_large(limit: int, size: int | None = None) -> ApiError:
    """413; `size`: the declared length (None: counted while reading, the rest unknown)."""
    said = f"{size} bytes" if size is not None else f"over {limit} bytes"
    return ApiError(413, f"the request body is {said}; at most {limit} bytes allowed here", code="request_too_large")


async def bounded_stream(request, limit: int):
    """The body's chunks; ApiError 413 as soon as it is (or says it will be) over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large(limit, int(declared))
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        yield chunk


def _unique_keys(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise invalid(key, f"'{key}' is given more than once")
        seen[key] = value
    return seen


async def json_object(request, limit: int) -> dict:
    """The body as a JSON object (at most `limit` bytes)."""
    body = b"".join([chunk async for chunk in bounded_stream(request, limit)])
    try:
        value = json.loads(body, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        detail = str(exc).split(":")[0] if isinstance(exc, ValueError) else "nested too deeply"
        raise invalid(None, f"the body is not valid JSON ({detail}); send a JSON object with "
                            "Content-Type: application/json") from None
    if not isinstance(value, dict):
        raise invalid(None, "the body must be a JSON object")
    return value


async def multipart_form(request, limit: int, max_files: int) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """(text fields, {file field: [contents, in order]}) of a multipart/form-data body of at most
    `limit` bytes holding at most `max_files` files."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise invalid(None, "the body must be multipart/form-data, with the references as files 'image' or 'image[]'")
    parser = MultiPartParser(request.headers, bounded_stream(request, limit), max_files=max_files,
                             max_fields=FORM_FIELDS, max_part_size=FORM_FIELD_BYTES)
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        if "files" in exc.message:
            raise invalid("image", f"the form holds more than {max_files} files ({exc.message})") from None
        raise invalid(None, f"the multipart body is malformed: {exc.message}") from None
    fields, files = {}, {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.setdefault(name, []).append(await value.read())
            elif name in fields:
                raise invalid(name, f"'{name}' is given more than once")
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields, files
