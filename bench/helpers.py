"""Helpers for the tests, benchmarks, load tests and the demo: deterministic reference pictures and
the server's own metrics. Not part of the production client (flux2_serving/clients/api.py)."""

from __future__ import annotations

import io
import re
import urllib.request

import numpy as np
from PIL import Image


def _metrics(metrics_url: str) -> str:
    return urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10).read().decode()


def reference_cache_metrics(metrics_url: str = "127.0.0.1:8002") -> dict[str, float]:
    """The server's reference K/V cache metrics (hits_total, misses_total, evictions_total, bytes,
    entries), summed over BLS instances, from Triton's Prometheus metrics endpoint."""
    text = _metrics(metrics_url)
    totals: dict[str, float] = {}
    for name, value in re.findall(r"^flux2_reference_cache_(\w+)\{[^}]*\} ([0-9.e+]+)$", text, re.M):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def metric_by_label(metrics_url: str, metric: str, label: str) -> dict[str, float]:
    """{value of `label`: `metric` summed over every other label (e.g. the BLS instances)}, from
    Triton's Prometheus metrics endpoint."""
    totals: dict[str, float] = {}
    pattern = rf"^{metric}\{{([^}}]*)\}} ([0-9.e+-]+)$"
    for labels, value in re.findall(pattern, _metrics(metrics_url), re.M):
        key = re.search(rf'{label}="([^"]*)"', labels).group(1)
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def bls_output_devices(metrics_url: str = "127.0.0.1:8002") -> dict[str, float]:
    """{device: tensors} the BLS received from component models (all instances), from the metrics
    endpoint: on a GPU server every one should have arrived on cuda."""
    return metric_by_label(metrics_url, "flux2_bls_component_outputs_total", "device")


def synthetic_reference(size: tuple[int, int], hue: int) -> bytes:
    """A deterministic PNG reference picture (no image files ship with the repository)."""
    from PIL import ImageDraw

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
