"""The reference K/V cache on its own: the BLS's key coverage and the cache model's LRU under a byte budget."""

from __future__ import annotations

import pytest
import torch

from flux2_serving.contract.reference_key import reference_key
from flux2_serving.models.lru import ReferenceKVCache


def _refs(*shapes, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(1, 3, h, w, generator=generator) for h, w in shapes]


def test_key_covers_order_size_pixels_and_model():
    a, b = _refs((32, 48), (48, 32))
    base = reference_key([a, b], "m:1")
    assert reference_key([a.clone(), b.clone()], "m:1") == base  # content, not identity
    assert reference_key([b, a], "m:1") != base  # order
    assert reference_key([a], "m:1") != base  # a part of the set is a different key
    assert reference_key([a, b], "m:2") != base  # model version
    assert reference_key([a, b.reshape(1, 3, 32, 48)], "m:1") != base  # same pixels, other size
    changed = b.clone()
    changed[0, 1, 5, 7] += 1e-6
    assert reference_key([a, changed], "m:1") != base  # one value


def test_lru_evicts_least_recently_used_within_budget():
    entry = torch.zeros(2, 128)  # two blocks of 512 B: 1 KiB
    cache = ReferenceKVCache(budget_bytes=3 * 1024)
    for key in "abc":
        assert cache.put(key, list(entry.clone()))
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", list(entry.clone()))  # evicts b
    assert cache.get("b") is None and cache.get("c") is not None
    assert list(cache.entries) == ["a", "d", "c"]  # least recent first
    assert cache.bytes_held == 3 * 1024 <= cache.budget_bytes
    assert (cache.hits, cache.misses, cache.evictions) == (2, 1, 1)


def test_entry_larger_than_budget_is_not_stored():
    cache = ReferenceKVCache(budget_bytes=100)
    assert not cache.put("big", [torch.zeros(20), torch.zeros(20)])  # 160 B in two blocks
    assert cache.bytes_held == 0 and cache.get("big") is None


def test_room_is_made_before_a_new_set_is_copied():
    """The cache model evicts (make_room) before it copies a new set in, so the old entries and the copy never
    exceed the budget together; what torch's allocator keeps of evicted blocks the memory plan adds as one set."""
    from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
    from flux2_serving.serving.memory_plan import cache_peak_bytes, kv_set_bytes

    entry = torch.zeros(2, 128)  # 1 KiB
    cache = ReferenceKVCache(budget_bytes=2 * 1024)
    for key in "ab":
        assert cache.put(key, list(entry.clone()))
    assert cache.make_room(1024) and list(cache.entries) == ["b"] and cache.bytes_held == 1024
    assert not cache.make_room(3 * 1024) and list(cache.entries) == ["b"]  # too big: nothing evicted
    held_when_copied = []
    whole = torch.zeros(2, 256)  # 2 KiB: the whole budget
    assert cache.put("c", list(whole), copy=lambda t: held_when_copied.append(cache.bytes_held) or t.clone())
    assert held_when_copied == [0, 0] and list(cache.entries) == ["c"]  # b evicted before the first copy
    assert not cache.put("c", list(whole), copy=lambda t: pytest.fail("copied a key held already"))
    dims = {"kv_layers": 32, "heads": 32, "head_dim": 128}
    assert kv_set_bytes(dims, "bf16", DEFAULT_ENVELOPE) == 2 * 2**30  # 4096 tokens at 9B
    assert cache_peak_bytes(dims, "bf16", DEFAULT_ENVELOPE) == DEFAULT_ENVELOPE.reference_cache_bytes + 2 * 2**30
