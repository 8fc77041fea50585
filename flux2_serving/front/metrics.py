"""The front's own Prometheus metrics (GET /metrics), apart from Triton's (port 8002).

What the front adds to a request is what they measure: requests by endpoint and status (OpenAI
errors included: 4xx are callers' mistakes, 429/503 Triton's load or absence), the whole request's
seconds, the Triton call's seconds (their difference is the front's parsing, encoding and transfer),
and the requests in flight. One registry per app, so several apps can live in one process (tests).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300)
ENDPOINTS = ("/v1/images/generations", "/v1/images/edits", "/v1/models", "/health", "/health/ready", "/metrics")
PREFIXES = {"/v1/models/": "/v1/models/{model}", "/v1/images/files/": "/v1/images/files/{name}"}


def endpoint_of(path: str) -> str:
    """The metric label of a path: a route's template, "other" for anything unknown (bounded labels)."""
    if path in ENDPOINTS:
        return path
    return next((label for prefix, label in PREFIXES.items() if path.startswith(prefix)), "other")


class FrontMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("flux2_front_requests", "HTTP requests answered, by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.seconds = Histogram("flux2_front_request_seconds", "Seconds from a request's arrival to its answer",
                                 ["endpoint"], buckets=BUCKETS, registry=self.registry)
        self.triton_seconds = Histogram("flux2_front_triton_seconds", "Seconds of each Triton inference call",
                                        ["outcome"], buckets=BUCKETS, registry=self.registry)
        self.in_flight = Gauge("flux2_front_in_flight_requests", "Requests being answered now",
                               registry=self.registry)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
