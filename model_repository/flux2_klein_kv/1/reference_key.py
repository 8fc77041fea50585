"""The key of the cross-request reference K/V cache.

Reference K/V is a function of the ordered set of preprocessed references alone, so a request
whose references hash the same as an earlier one's can skip VAE encoding and the prefill. The
key covers every reference, in order, with its size, plus the model identity; never a part of
the set, since with several references every reference token attends to all the others.
"""

from __future__ import annotations

import hashlib

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
