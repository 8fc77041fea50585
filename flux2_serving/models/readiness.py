"""What the BLS's `is_ready()` answers (Triton 26.03 and later ask it on every readiness request of the model:
python_backend PR #430; the 2.51 server of the CPU tests never does). No Triton import: unit-tested."""

from __future__ import annotations

import time
from collections.abc import Callable

# How long a dead component keeps the BLS "not ready" unless a call succeeds first: long enough for a
# readiness probe (Kubernetes: every 10 s) to see it and drain the replica while the watchdog or the
# supervisor reloads the component, short enough that a replica nobody sends requests to comes back by itself
# (readiness that waits for a successful call would never return once traffic stopped).
NOT_READY_FOR_S = 30.0


class Readiness:
    """Not ready while a component this model calls was last found dead (its process gone: Triton's "Stub
    process ... is not healthy") and neither a later call succeeded nor NOT_READY_FOR_S passed."""

    def __init__(self, hold_s: float = NOT_READY_FOR_S, clock: Callable[[], float] = time.monotonic):
        self.hold_s, self.clock = hold_s, clock
        self.dead_component: str | None = None
        self.since = 0.0

    def component_died(self, model: str) -> None:
        self.dead_component, self.since = model, self.clock()

    def call_succeeded(self) -> None:
        self.dead_component = None

    def ready(self) -> bool:
        return self.dead_component is None or self.clock() - self.since >= self.hold_s
