"""response_format=url: the encoded images kept in this process's memory for an hour.

OpenAI's URLs are valid for 60 minutes; here each image gets an unguessable name (128 random bits:
the name is the capability, so fetching needs no API key, as OpenAI's signed URLs need none), and
the store holds at most `max_bytes`, dropping the oldest first. The memory is one front process's:
behind several front replicas a URL resolves only at the replica that made it, so url mode needs
session affinity on the client address or a single replica (b64_json, the default, has no state).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import OrderedDict

TTL_S = 3600


class ImageStore:
    def __init__(self, base: str, max_bytes: int = 1 << 30, ttl_s: float = TTL_S):
        self.base, self.max_bytes, self.ttl_s = base.rstrip("/"), max_bytes, ttl_s
        self.items: OrderedDict[str, tuple[float, bytes, str]] = OrderedDict()  # name -> (expiry, data, type)
        self.bytes = 0
        self.lock = threading.Lock()  # put() runs in encoding threads, get() in the event loop

    def put(self, data: bytes, extension: str, media_type: str) -> str:
        """The URL of `data`, kept for ttl_s (or until max_bytes pushes it out)."""
        name = f"{secrets.token_urlsafe(16)}.{extension}"
        with self.lock:
            self._expire()
            self.items[name] = (time.monotonic() + self.ttl_s, data, media_type)
            self.bytes += len(data)
            while self.bytes > self.max_bytes and len(self.items) > 1:
                self.bytes -= len(self.items.popitem(last=False)[1][1])
        return f"{self.base}/v1/images/files/{name}"

    def get(self, name: str) -> tuple[bytes, str] | None:
        with self.lock:
            self._expire()
            item = self.items.get(name)
        return None if item is None else (item[1], item[2])

    def _expire(self) -> None:
        now = time.monotonic()
        while self.items and next(iter(self.items.values()))[0] < now:
            self.bytes -= len(self.items.popitem(last=False)[1][1])
