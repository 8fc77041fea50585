"""Position ids laid out as Flux2KleinKVPipeline lays them out, for the sample inputs of the export
(onnx_export, in torch) and the recorded inputs of the engine check (engine_check, which runs without
torch): numpy, int64, one place for both."""

from __future__ import annotations

import numpy as np


def grid_ids(height: int, width: int) -> np.ndarray:
    """[height, width, 4]: (0, h, w, 0) for every latent pixel of an image grid."""
    h, w = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    zeros = np.zeros_like(h)
    return np.stack([zeros, h, w, zeros], axis=-1).astype(np.int64)


def text_ids(length: int) -> np.ndarray:
    """[length, 4]: (0, 0, 0, l) for every text token."""
    positions = np.arange(length)
    zeros = np.zeros_like(positions)
    return np.stack([zeros, zeros, zeros, positions], axis=-1).astype(np.int64)


def reference_ids(n_ref: int) -> np.ndarray:
    """[n_ref, 4]: one reference of n_ref tokens as a 1 x n_ref grid at time 10: (10, 0, i, 0)."""
    positions = np.arange(n_ref)
    zeros = np.zeros_like(positions)
    return np.stack([np.full_like(positions, 10), zeros, positions, zeros], axis=-1).astype(np.int64)
