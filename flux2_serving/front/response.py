"""Triton's result -> OpenAI's ImagesResponse body (openai/types/images_response.py).

png is the BLS's own PNG passed on untouched (lossless: the same pixels the gRPC client gets);
jpeg and webp are encoded here with Pillow at `output_compression` as the quality (OpenAI's default
100). Beside OpenAI's fields the body carries `seed` (the noise's seed: the one sent, or the one the
server drew; send it back to reproduce the images) and `notes` (what the server changed in the
request, e.g. a reference cropped to multiples of 16): the official client keeps unknown fields
(`response.seed`, `response.model_extra`), and dropping them would hide how to reproduce a result.

`usage` is left out (it is optional in the client): its required text-token counts would need the
prompt's tokens, which only the server's tokenizer knows (the model always encodes 512 padded
tokens), and numbers that are not exact are not given.
"""

from __future__ import annotations

import base64
import io
import time

from PIL import Image

MEDIA_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


def encoded_images(result, output_format: str, compression: int | None) -> tuple[list[bytes], str]:
    """(one encoded image per output, "WIDTHxHEIGHT")."""
    if output_format == "png":
        images = [bytes(data) for data in result.as_numpy("png").reshape(-1)]
        width, height = Image.open(io.BytesIO(images[0])).size  # the header only
        return images, f"{width}x{height}"
    pixels = result.as_numpy("images")  # [N, H, W, 3] uint8
    encoded = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format=output_format.upper(), quality=100 if compression is None
                                    else compression)
        encoded.append(buffer.getvalue())
    return encoded, f"{pixels.shape[2]}x{pixels.shape[1]}"


def seed_and_notes(result) -> tuple[int | None, list[str]]:
    seed, notes = result.as_numpy("seed"), result.as_numpy("notes")
    return (None if seed is None else int(seed.reshape(-1)[0]),
            [] if notes is None else [bytes(note).decode() for note in notes.reshape(-1)])


def images_response(result, output_format: str, compression: int | None, urls=None) -> dict:
    """The response body. `urls`: a function from the encoded images to their URLs
    (response_format=url), else the images travel as b64_json."""
    images, size = encoded_images(result, output_format, compression)
    data = ([{"url": url} for url in urls(images)] if urls
            else [{"b64_json": base64.b64encode(image).decode()} for image in images])
    seed, notes = seed_and_notes(result)
    return {"created": int(time.time()), "data": data, "background": "opaque", "output_format": output_format,
            "size": size, "seed": seed, "notes": notes}
