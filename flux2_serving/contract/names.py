"""Names shared across the wire and the repository, declared once: the Triton models, the routing
header, the cached K/V outputs and the words by which Triton and the BLS say "overloaded".
Standard library only."""

from __future__ import annotations

BLS_MODEL = "flux2_klein_kv"  # the public model
CACHE_MODEL = "reference_kv_cache"  # internal: reference K/V shared by the BLS instances

# Requests carrying this header (HTTP) or metadata (gRPC), the sha256 of their encoded references,
# are routed to one replica by a gateway (contract/reference_key.encoded_reference_key).
ROUTING_HEADER = "x-flux2-reference-key"

# What Triton answers when a model's queue is full or a request waited its queue timeout out, and
# the BLS's own answer when a component's queue was full: UNAVAILABLE, retry later.
QUEUE_FULL = "Exceeds maximum queue size"
QUEUE_TIMEOUT = "Request timeout expired"
BLS_OVERLOADED = "server overloaded, retry later"
OVERLOADED_MARKS = (QUEUE_FULL, QUEUE_TIMEOUT, BLS_OVERLOADED)
SHUTTING_DOWN = "Server not ready"  # Triton refuses new calls while it stops
# Triton's words when a request reached a Python-backend process that died ("Stub process '<instance>'
# is not healthy."), and what the BLS adds (as UNAVAILABLE) when that process is a component's: the
# launcher's supervisor replaces it (flux2_serving/server/supervisor.py), so the request can be sent again.
DEAD_PROCESS = "is not healthy"
PROCESS_REPLACED = "(a process of the server died and is being replaced: send the request again)"


def cached_name(kv_name: str) -> str:
    """The cache's output for a per-block K/V input: ref_kv_07 -> cached_kv_07."""
    prefix = "ref_"
    if not kv_name.startswith(prefix):
        raise ValueError(f"not a K/V tensor name: {kv_name!r}")
    return "cached_" + kv_name[len(prefix):]
