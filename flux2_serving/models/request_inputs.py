"""Parsing and validation of a `flux2_klein_kv` request against its public interface
(contract/interface.py): every failure names the field and the limit and becomes a Triton
INVALID_ARG. Nothing is clamped or dropped. The limits come from the envelope through the model's
config.pbtxt parameters (Limits has no defaults of its own).

What diffusers changes in a valid request without a word (a reference's alpha channel dropped, a
reference resized to the area cap or cropped to multiples of 16) the served pipeline changes the
same way, for parity, but says so: one line per change, appended to a `notes` list, which the BLS
returns as the public output `notes`.

A reference's size after preprocessing follows from its header alone (preprocessed_size), so every
size and token limit is checked before any pixel is decoded. Pillow's own decompression-bomb guard
(Image.MAX_IMAGE_PIXELS, refusing at open() what declares over twice that) is left at its default,
above max_input_pixels: never disabled here."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from PIL import Image

from ..contract.interface import DEFAULT_NUM_IMAGES_PER_PROMPT, DEFAULT_NUM_INFERENCE_STEPS, Limits


class InvalidInput(ValueError):
    """A client error: reported as INVALID_ARG, the server keeps serving."""


@dataclass
class GenerationRequest:
    prompt: str
    encoded: list = field(default_factory=list)  # the references' bytes as sent, in request order
    images: list = field(default_factory=list)  # the same, opened with PIL (header checked, not decoded)
    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_images_per_prompt: int = DEFAULT_NUM_IMAGES_PER_PROMPT
    num_inference_steps: int = DEFAULT_NUM_INFERENCE_STEPS
    reuse_reference_cache: bool = True  # False: neither look up nor store this request's reference K/V


def _scalar(array, name: str):
    if array.size != 1:
        raise InvalidInput(f"'{name}' must hold exactly one value, got {array.size}")
    value = array.reshape(-1)[0]
    return value.item() if hasattr(value, "item") else value  # numpy scalar, or bytes for strings


def open_image(data: bytes, index: int, limits: Limits) -> Image.Image:
    """Read one reference's header and check its size; no pixel is decoded (load_rgb does that, and
    a request whose references' K/V are cached never needs to)."""
    field_name = f"image[{index}]"
    if len(data) > limits.max_reference_bytes:
        raise InvalidInput(f"'{field_name}' is {len(data)} bytes; at most {limits.max_reference_bytes} bytes allowed")
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError as exc:  # Pillow's own guard, before ours: the same limit, said as ours
        raise InvalidInput(f"'{field_name}' declares more than {2 * Image.MAX_IMAGE_PIXELS} pixels; at most "
                           f"{limits.max_input_pixels} pixels allowed") from exc
    except Exception as exc:  # PIL raises several types for bad bytes
        raise InvalidInput(f"'{field_name}' is not a decodable PNG/JPEG/WebP image ({type(exc).__name__})") from exc
    width, height = image.size
    if width * height > limits.max_input_pixels:
        raise InvalidInput(f"'{field_name}' declares {width}x{height} = {width * height} pixels, "
                           f"over the limit of {limits.max_input_pixels} pixels")
    low = limits.min_reference_side
    if width < low or height < low:
        raise InvalidInput(f"'{field_name}' is {width}x{height}; both sides must be at least {low} px")
    if max(width, height) > limits.max_reference_aspect * min(width, height):
        raise InvalidInput(f"'{field_name}' is {width}x{height}; the aspect ratio must be at most "
                           f"{limits.max_reference_aspect}:1")
    return image


def load_rgb(image: Image.Image, index: int, notes: list | None = None) -> Image.Image:
    """Decode an opened reference's pixels as RGB (RGBA, grayscale, palette, CMYK, 16-bit: as
    diffusers accepts them); a broken file is the client's error. A transparency that the RGB
    conversion drops is noted in `notes` (a fully opaque alpha channel changes no pixel: no note)."""
    try:
        image.load()
        if notes is not None and transparent(image):
            notes.append(f"image[{index}]: alpha channel dropped ({image.mode} converted to RGB, as diffusers does: "
                         "transparent pixels show their stored color)")
        return image.convert("RGB")
    except Exception as exc:  # PIL raises several types for a broken file
        raise InvalidInput(f"'image[{index}]' could not be decoded ({type(exc).__name__}: {exc})") from exc


def transparent(image: Image.Image) -> bool:
    """Whether a decoded image has a pixel that is not fully opaque: an alpha channel (RGBA, LA, PA)
    or a transparent color (palette or tRNS chunk), with at least one pixel below 255."""
    if "A" in image.getbands():
        return image.getchannel("A").getextrema()[0] < 255
    if "transparency" in image.info:
        return image.convert("RGBA").getchannel("A").getextrema()[0] < 255
    return False


def decode_image(data: bytes, index: int, limits: Limits, notes: list | None = None) -> Image.Image:
    """open_image, then load_rgb: one reference, checked and decoded."""
    return load_rgb(open_image(data, index, limits), index, notes)


def parse(inputs: dict, limits: Limits) -> GenerationRequest:
    """`inputs`: {name: numpy array} of the request's tensors (optional ones may be absent)."""
    if "prompt" not in inputs:
        raise InvalidInput("'prompt' is required")
    prompt = _scalar(inputs["prompt"], "prompt")
    size = len(prompt) if isinstance(prompt, bytes) else len(str(prompt).encode())
    if size > limits.max_prompt_bytes:
        raise InvalidInput(f"'prompt' is {size} bytes; at most {limits.max_prompt_bytes} bytes allowed (only its first "
                           "tokens reach the text encoder, as in diffusers)")
    try:
        prompt = prompt.decode("utf-8", errors="strict") if isinstance(prompt, bytes) else str(prompt)
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"'prompt' is not valid UTF-8 (byte {exc.start})") from exc
    if not prompt.strip():
        raise InvalidInput("'prompt' must be a non-empty string")
    request = GenerationRequest(prompt=prompt)

    encoded = inputs.get("image")
    if encoded is not None:
        encoded = encoded.reshape(-1)
        if len(encoded) > limits.max_references:
            raise InvalidInput(f"'image' holds {len(encoded)} references; at most {limits.max_references} allowed")
        request.encoded = [bytes(data) for data in encoded]
        request.images = [open_image(data, i, limits) for i, data in enumerate(request.encoded)]

    for name in ("height", "width"):
        if name in inputs:
            value = int(_scalar(inputs[name], name))
            if value % limits.multiple_of or not limits.min_side <= value <= limits.max_side:
                raise InvalidInput(f"'{name}' is {value}; it must be a multiple of {limits.multiple_of} "
                                   f"in [{limits.min_side}, {limits.max_side}]")
            setattr(request, name, value)
    if "seed" in inputs:
        request.seed = int(_scalar(inputs["seed"], "seed"))
        if request.seed < 0:
            raise InvalidInput(f"'seed' is {request.seed}; it must be >= 0")
    for name in ("num_images_per_prompt", "num_inference_steps"):
        if name in inputs:
            value, most = int(_scalar(inputs[name], name)), getattr(limits, f"max_{name}")
            if not 1 <= value <= most:
                raise InvalidInput(f"'{name}' is {value}; it must be in [1, {most}]")
            setattr(request, name, value)
    if "reuse_reference_cache" in inputs:
        request.reuse_reference_cache = bool(_scalar(inputs["reuse_reference_cache"], "reuse_reference_cache"))
    return request


def preprocessed_size(width: int, height: int, limits: Limits) -> tuple[int, int]:
    """(height, width) that preprocess_reference gives a width x height reference, from the two numbers
    alone: over the area cap, both sides scaled by sqrt(cap / area) and truncated (diffusers'
    Flux2ImageProcessor._resize_to_target_area, in the same float operations, so the same integers;
    tests/test_latent_layout.py compares them), then cut down to multiples of 16."""
    area = width * height
    if area > limits.reference_max_area:
        scale = math.sqrt(limits.reference_max_area / area)
        width, height = int(width * scale), int(height * scale)
    step = limits.multiple_of
    return (height // step) * step, (width // step) * step


def preprocess_reference(image: Image.Image, processor, limits: Limits, notes: list | None = None, index: int = 0):
    """As Flux2KleinKVPipeline.__call__: resize down to the area cap, crop to multiples of 16.
    `processor` is diffusers' Flux2ImageProcessor; returns [1, 3, H, W] in [-1, 1]. A size changed is
    noted in `notes`, naming the reference as image[index]."""
    sent = image.size
    if image.width * image.height > limits.reference_max_area:
        image = processor._resize_to_target_area(image, limits.reference_max_area)
    step = limits.multiple_of
    width, height = (image.width // step) * step, (image.height // step) * step
    if notes is not None and (width, height) != sent:
        changes = []
        if image.size != sent:
            changes.append(f"resized to {image.width}x{image.height} (at most {limits.reference_max_area} pixels)")
        if (width, height) != image.size:
            changes.append(f"cropped to {width}x{height} (sides multiples of {step})")
        notes.append(f"image[{index}]: {sent[0]}x{sent[1]} {' and '.join(changes)}")
    return processor.preprocess(image, height=height, width=width, resize_mode="crop")


def output_size(request: GenerationRequest, sizes: list[tuple[int, int]], limits: Limits) -> tuple[int, int]:
    """Output (height, width): as asked, else the first preprocessed reference's, else the default.
    `sizes`: the preprocessed references' (height, width), from their headers (header_sizes) before
    decoding, from their pixels after. Also checks the reference set's token count (its K/V size),
    so every limit is checked before any pixel is decoded and the first component model runs."""
    step = limits.multiple_of
    for index, (h, w) in enumerate(sizes):  # guaranteed by the area cap and the aspect limit; checked anyway
        if not limits.min_reference_side <= min(h, w) <= max(h, w) <= limits.max_reference_side:
            raise InvalidInput(f"'image[{index}]' is {w}x{h} after preprocessing; sides must be in "
                               f"[{limits.min_reference_side}, {limits.max_reference_side}]")
    tokens = sum((h // step) * (w // step) for h, w in sizes)
    if tokens > limits.max_reference_tokens:
        listed = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise InvalidInput(f"'image': the references hold {tokens} tokens after preprocessing ({listed} px, one "
                           f"token per {step}x{step} px); at most {limits.max_reference_tokens} allowed: send fewer "
                           "or smaller references")
    height, width = request.height, request.width
    if sizes:
        ref_h, ref_w = sizes[0]
        height, width = height or ref_h, width or ref_w
    height, width = height or limits.default_side, width or limits.default_side
    for name, value in (("height", height), ("width", width)):
        if not limits.min_side <= value <= limits.max_side:
            raise InvalidInput(f"output {name} {value} (taken from image[0]) is outside "
                               f"[{limits.min_side}, {limits.max_side}]; pass '{name}' explicitly")
    return height, width


def header_sizes(request: GenerationRequest, limits: Limits) -> list[tuple[int, int]]:
    """The references' (height, width) after preprocessing, read from their headers (nothing decoded)."""
    return [preprocessed_size(*image.size, limits) for image in request.images]
