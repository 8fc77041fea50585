"""The keys of the cross-request reference K/V cache.

Reference K/V is a function of the ordered set of preprocessed references alone, so a request
whose references hash the same as an earlier one's can skip VAE encoding and the prefill. The
key covers every reference, in order, with its size, plus the model identity; never a part of
the set, since with several references every reference token attends to all the others.

Computing that key means decoding and preprocessing the references. A first-level key over the
encoded bytes, in order, lets a repeat of the very same bytes skip both (the BLS maps it to the
pixel key it was found to have); the pixel key behind it still matches the same picture sent in
another encoding.
"""

from __future__ import annotations

import hashlib


def reference_key(references: list, model_identity: str) -> str:
    """sha256 over the model identity and each preprocessed reference's dtype, shape and pixels
    (torch tensors, used through their methods: this module imports nothing but the standard library)."""
    digest = hashlib.sha256(model_identity.encode())
    digest.update(len(references).to_bytes(4, "little"))
    for image in references:
        pixels = image.detach().to("cpu").contiguous()
        digest.update(f"{pixels.dtype}:{tuple(pixels.shape)}".encode())
        if str(pixels.dtype) == "torch.bfloat16":  # numpy has no bfloat16: its float32 values are exact
            pixels = pixels.float()
        digest.update(pixels.numpy().tobytes())
    return digest.hexdigest()


def encoded_reference_key(encoded: list[bytes]) -> str:
    """sha256 over the references' encoded bytes, in order, each with its length. Clients send it as
    the routing header (names.ROUTING_HEADER; clients/api.py), so a gateway can hash one
    reference set to one replica."""
    digest = hashlib.sha256(len(encoded).to_bytes(4, "little"))
    for data in encoded:
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()
