"""Deterministic pictures for tests, benchmarks and the demo (no image files ship with the repository)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw


def synthetic_reference(size: tuple[int, int], hue: int) -> bytes:
    """A deterministic PNG reference picture: a hue gradient with a light ellipse."""
    width, height = size
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    pixels = np.stack([np.broadcast_to((x + hue) % 256, (height, width)), np.broadcast_to(y, (height, width)),
                       np.full((height, width), hue, np.float32)], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels)
    ImageDraw.Draw(image).ellipse((width // 4, height // 4, 3 * width // 4, 3 * height // 4), fill=(240, 240, 240))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
