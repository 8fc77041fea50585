"""The LRU behind the `reference_kv_cache` model: K/V tensors under a byte budget."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch


class ReferenceKVCache:
    """Least-recently-used K/V (a list of per-block tensors each) under a byte budget (the caller
    decides where they live)."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[str, list[torch.Tensor]] = OrderedDict()
        self.bytes_held = 0
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def nbytes(tensors: list[torch.Tensor]) -> int:
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors)

    def get(self, key: str) -> list[torch.Tensor] | None:
        tensor = self.entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return tensor

    def make_room(self, size: int) -> bool:
        """Evict least recently used entries until `size` more bytes fit; False (nothing evicted) if `size`
        alone exceeds the budget. Called before a new entry is copied, so that the old entries and the copy
        never exceed the budget together."""
        if size > self.budget_bytes:
            return False
        while self.bytes_held + size > self.budget_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes_held -= self.nbytes(evicted)
            self.evictions += 1
        return True

    def put(self, key: str, tensor: list[torch.Tensor], copy: Callable[[torch.Tensor], torch.Tensor] | None = None
            ) -> bool:
        """Store `tensor` (per-block K/V), evicting the least recently used entries first; False if it alone
        exceeds the budget or `key` is held already. `copy`: what is stored of each tensor (e.g. a copy on the
        serving device), made only after the room, so that the old entries and the copy never exceed the
        budget together, and not at all for a key held already."""
        size = self.nbytes(tensor)
        if key in self.entries or not self.make_room(size):
            return False
        self.entries[key] = [copy(t) for t in tensor] if copy else tensor
        self.bytes_held += size
        return True
