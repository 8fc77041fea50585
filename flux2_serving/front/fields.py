"""An OpenAI Images request (JSON for generations, multipart form fields for edits) -> one BLS request.

Why by hand rather than a pydantic schema: every refusal must be OpenAI's error shape with `param`
naming the field and a message naming the limit, and a form sends every value as a string, so the
same field arrives as 7 or "7". What the model cannot honour is refused, never dropped: an
OpenAI field is accepted only at the value that means "the default" (ACCEPTED), and a name that is
neither OpenAI's nor one of the model's own (EXTRAS, sent in `extra_body`) is an unknown parameter.
Limits that the served model knows (sizes, n, steps, prompt length, the references' contents) are
left to the BLS, whose one-line answer errors.from_triton maps back onto these names; checked here
are the shapes of values, what must fit the wire's integer types, and the references' count and
bytes (before they travel to Triton).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from flux2_serving.clients.api import SCALAR_TYPES, InvalidRequest, utf8
from flux2_serving.contract.interface import GenerationOptions

from .errors import ApiError, invalid, shown, unsupported

FORMATS = ("png", "jpeg", "webp")
RESPONSE_FORMATS = ("b64_json", "url")
# OpenAI fields that this model has no counterpart for: accepted only at these values (absent or null too).
ACCEPTED = {
    "quality": ("auto",),
    "background": ("auto", "opaque"),  # our images are always opaque RGB
    "moderation": ("auto", "low"),  # (no moderation runs here: the deployment's concern)
    "style": (),
    "stream": (False,),
    "partial_images": (0,),
}
EDIT_ONLY = {"input_fidelity": ("low",)}
OPENAI_FIELDS = ("prompt", "model", "n", "size", "response_format", "output_format", "output_compression", "user")
EXTRAS = ("seed", "num_inference_steps", "reuse_reference_cache")  # the model's own, through extra_body
_SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")
_FORM_INTEGER = re.compile(r"[+-]?\d{1,25}")


@dataclass(frozen=True)
class ImageRequest:
    """What the front sends to the BLS and how it answers."""

    prompt: str
    references: tuple[bytes, ...]
    options: GenerationOptions
    output_format: str = "png"
    compression: int | None = None  # jpeg/webp quality 0-100 (OpenAI's output_compression)
    response_format: str = "b64_json"
    user: str | None = None


def _integer(name: str, value, form: bool, low: int, high: int, wire: str = "") -> int:
    if form and isinstance(value, str) and _FORM_INTEGER.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(name, f"'{name}' must be an integer, got {shown(value)}")
    if not low <= value <= high:
        raise invalid(name, f"'{name}' is {value}; it must be in [{low}, {high}]{wire}")
    return value


def _wire_integer(name: str, value, form: bool, openai_name: str | None = None) -> int:
    """An integer that must fit the BLS input's type; the BLS checks the model's own range."""
    info = np.iinfo(SCALAR_TYPES[name][0])
    return _integer(openai_name or name, value, form, int(info.min), int(info.max),
                    f" (the model's {SCALAR_TYPES[name][1]} input)")


def _boolean(name: str, value, form: bool) -> bool:
    if form and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise invalid(name, f"'{name}' must be true or false, got {shown(value)}")
    return value


def _text(name: str, value) -> str:
    """A string that has UTF-8 bytes: JSON can escape a lone surrogate ("\\ud800"), which Python
    decodes into a str that no encoder takes (the client's utf8() says so, naming the field)."""
    if not isinstance(value, str):
        raise invalid(name, f"'{name}' must be a string, got {shown(value)}")
    try:
        utf8(name, value)
    except InvalidRequest as exc:
        raise invalid(name, str(exc)) from None
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise invalid(name, f"'{name}' is {shown(value)}; it must be one of {', '.join(choices)}")
    return value


def size_of(value) -> tuple[int | None, int | None]:
    """(width, height) from OpenAI's "WIDTHxHEIGHT" (width first); None for "auto" or absent."""
    if value is None or value == "auto":
        return None, None
    match = _SIZE.fullmatch(value) if isinstance(value, str) else None
    if not match:
        raise invalid("size", f"'size' is {shown(value)}; it must be 'auto' or 'WIDTHxHEIGHT' in pixels "
                              "(e.g. '1024x1024', sides multiples of 16)")
    return int(match.group(1)), int(match.group(2))


def _check_names(values: dict, edit: bool) -> None:
    known = {*OPENAI_FIELDS, *ACCEPTED, *EXTRAS, *(EDIT_ONLY if edit else ())}
    for name in values:
        if name not in known:
            raise invalid(name, f"unknown parameter '{name}'; this server accepts {', '.join(sorted(known))}"
                                f"{' and the files image / image[]' if edit else ''}", "unknown_parameter")


def _check_accepted(values: dict, form: bool, edit: bool) -> None:
    for name, accepted in {**ACCEPTED, **(EDIT_ONLY if edit else {})}.items():
        value = values.get(name)
        if value is None:
            continue
        if form and name == "stream":
            value = _boolean(name, value, form)
        elif form and name == "partial_images":
            value = _integer(name, value, form, 0, 3)
        if value not in accepted:
            said = f"send {' or '.join(shown(v) for v in accepted)}, or leave it out" if accepted else "leave it out"
            raise unsupported(name, value, f"this model has no such setting: {said}")


def image_request(values: dict, references=(), *, model_id: str, form: bool = False, edit: bool = False,
                  url_base: str | None = None, max_references: int = 4, max_image_bytes: int = 2**26) -> ImageRequest:
    """`values`: the request's fields (JSON values, or strings from a form when `form`); `references`:
    the edit's files in order. Raises ApiError naming the field at fault."""
    values = {name: value for name, value in values.items() if value is not None}  # null: left out
    _check_names(values, edit)
    model = values.get("model")
    if model is not None and model != model_id:
        raise ApiError(404, f"model {shown(model)} does not exist here; this server serves {model_id!r} "
                            "(GET /v1/models)", param="model", code="model_not_found")
    _check_accepted(values, form, edit)
    if "prompt" not in values:
        raise invalid("prompt", "'prompt' is required", "missing_required_parameter")
    _text("prompt", values["prompt"])
    _check_references(references, edit, max_references, max_image_bytes)

    output_format = _choice("output_format", values.get("output_format", "png"), FORMATS)
    compression = values.get("output_compression")
    if compression is not None:
        compression = _integer("output_compression", compression, form, 0, 100)
        if output_format == "png" and compression != 100:
            raise invalid("output_compression", f"'output_compression' is {compression}; it applies to jpeg and "
                                                "webp only (png is lossless): leave it out or send output_format")
    response_format = _choice("response_format", values.get("response_format", "b64_json"), RESPONSE_FORMATS)
    if response_format == "url" and url_base is None:
        raise unsupported("response_format", "url", "this server answers 'b64_json' only (it was started "
                                                    "without --url-base)")
    user = values.get("user")
    if user is not None:
        _text("user", user)

    width, height = size_of(values.get("size"))
    n = values.get("n")
    options = GenerationOptions(
        height=height, width=width,
        num_images_per_prompt=None if n is None else _wire_integer("num_images_per_prompt", n, form, "n"),
        seed=None if "seed" not in values else _wire_integer("seed", values["seed"], form),
        num_inference_steps=(None if "num_inference_steps" not in values
                             else _wire_integer("num_inference_steps", values["num_inference_steps"], form)),
        reuse_reference_cache=(None if "reuse_reference_cache" not in values
                               else _boolean("reuse_reference_cache", values["reuse_reference_cache"], form)))
    return ImageRequest(values["prompt"], tuple(references), options, output_format, compression, response_format,
                        user)


def _check_references(references, edit: bool, most: int, max_bytes: int) -> None:
    if not edit:
        return
    if not references:
        raise invalid("image", f"'image' is required: 1-{most} reference images, as multipart files 'image' or "
                               "'image[]'", "missing_required_parameter")
    if len(references) > most:
        raise invalid("image", f"'image' holds {len(references)} references; at most {most} allowed")
    for index, data in enumerate(references):
        if len(data) > max_bytes:
            raise invalid("image", f"'image[{index}]' is {len(data)} bytes; at most {max_bytes} bytes allowed")
