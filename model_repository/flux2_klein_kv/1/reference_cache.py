"""Cross-request cache of reference K/V (DESIGN.md section 3).

Reference K/V is a function of the ordered set of preprocessed references alone, so a request
whose references hash the same as an earlier one's can skip VAE encoding and the prefill. The
key covers every reference, in order, with its size, plus the model identity; never a part of
the set, since with several references every reference token attends to all the others.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import torch


def reference_key(references: list[torch.Tensor], model_identity: str) -> str:
    """sha256 over the model identity and each preprocessed reference's dtype, shape and pixels."""
    digest = hashlib.sha256(model_identity.encode())
    digest.update(len(references).to_bytes(4, "little"))
    for image in references:
        pixels = image.detach().to("cpu").contiguous()
        digest.update(f"{pixels.dtype}:{tuple(pixels.shape)}".encode())
        digest.update(pixels.view(torch.uint8).numpy().tobytes() if pixels.dtype == torch.bfloat16
                      else pixels.numpy().tobytes())
    return digest.hexdigest()


class ReferenceKVCache:
    """Least-recently-used K/V tensors (kept where they were computed) under a byte budget."""

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self.entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.bytes_held = 0
        self.hits = self.misses = self.evictions = 0

    @staticmethod
    def nbytes(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def get(self, key: str) -> torch.Tensor | None:
        tensor = self.entries.get(key)
        if tensor is None:
            self.misses += 1
            return None
        self.entries.move_to_end(key)
        self.hits += 1
        return tensor

    def put(self, key: str, tensor: torch.Tensor) -> bool:
        """Store `tensor`, evicting the least recently used entries; False if it alone exceeds the budget."""
        size = self.nbytes(tensor)
        if size > self.budget_bytes or key in self.entries:
            return False
        while self.bytes_held + size > self.budget_bytes:
            _, evicted = self.entries.popitem(last=False)
            self.bytes_held -= self.nbytes(evicted)
            self.evictions += 1
        self.entries[key] = tensor
        self.bytes_held += size
        return True
