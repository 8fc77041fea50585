"""The server's own Prometheus metrics, read the way the tests and benchmarks need them."""

from __future__ import annotations

import re
import urllib.request


def scrape(metrics_url: str) -> str:
    """The metrics endpoint's text (`metrics_url`: host:port)."""
    return urllib.request.urlopen(f"http://{metrics_url}/metrics", timeout=10).read().decode()


def reference_cache_metrics(metrics_url: str = "127.0.0.1:8002") -> dict[str, float]:
    """The server's reference K/V cache metrics (hits_total, misses_total, evictions_total, bytes,
    entries), summed over BLS instances, from Triton's Prometheus metrics endpoint."""
    text = scrape(metrics_url)
    totals: dict[str, float] = {}
    for name, value in re.findall(r"^flux2_reference_cache_(\w+)\{[^}]*\} ([0-9.e+]+)$", text, re.M):
        totals[name] = totals.get(name, 0.0) + float(value)
    return totals


def metric_by_label(metrics_url: str, metric: str, label: str) -> dict[str, float]:
    """{value of `label`: `metric` summed over every other label (e.g. the BLS instances)}, from
    Triton's Prometheus metrics endpoint."""
    totals: dict[str, float] = {}
    pattern = rf"^{metric}\{{([^}}]*)\}} ([0-9.e+-]+)$"
    for labels, value in re.findall(pattern, scrape(metrics_url), re.M):
        key = re.search(rf'{label}="([^"]*)"', labels).group(1)
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals


def bls_output_devices(metrics_url: str = "127.0.0.1:8002") -> dict[str, float]:
    """{device: tensors} the BLS received from component models (all instances), from the metrics
    endpoint: on a GPU server every one should have arrived on cuda."""
    return metric_by_label(metrics_url, "flux2_bls_component_outputs_total", "device")
