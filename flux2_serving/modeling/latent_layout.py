"""The token layout of Flux2KleinKVPipeline, written here rather than borrowed from diffusers' private
static helpers (Flux2Pipeline._prepare_text_ids, _prepare_latent_ids, _prepare_image_ids,
_patchify_latents, _unpatchify_latents, _pack_latents): the served pipeline, the export and the engine
check depend on this layout, and private names change without notice upstream (their dtypes already
have). Each function says which helper it stands for; tests/test_latent_layout.py checks that they
still equal diffusers' on the pinned version (DIFFUSERS_VERSION).

Position ids are numpy int64 (the engine check runs without torch); the latent reshapes take torch
tensors, which this module imports only when one is called.
"""

from __future__ import annotations

import numpy as np

DIFFUSERS_VERSION = "0.42.1"  # the version whose helpers these equal (requirements.txt pins it)
REFERENCE_TIME_SCALE = 10  # _prepare_image_ids: the i-th reference sits at time 10 + 10 i


def _ids(*axes) -> np.ndarray:
    """Rows (t, h, w, l) of every combination of the four axes' values, the last fastest
    (torch.cartesian_prod's order)."""
    grid = np.meshgrid(*(np.asarray(axis) for axis in axes), indexing="ij")
    return np.stack([axis.reshape(-1) for axis in grid], axis=-1).astype(np.int64)


def text_ids(length: int) -> np.ndarray:
    """[length, 4]: (0, 0, 0, l) for every text token (_prepare_text_ids of one prompt)."""
    return _ids([0], [0], [0], np.arange(length))


def grid_ids(height: int, width: int) -> np.ndarray:
    """[height, width, 4]: (0, h, w, 0) for every latent pixel of the output grid (_prepare_latent_ids
    of one sample, viewed as its grid)."""
    return _ids([0], np.arange(height), np.arange(width), [0]).reshape(height, width, 4)


def image_ids(grids: list[tuple[int, int]]) -> np.ndarray:
    """[sum of h * w, 4]: every reference's tokens in order, the i-th at time 10 + 10 i:
    (10 + 10 i, h, w, 0) (_prepare_image_ids of the references' latent grids)."""
    if not grids:
        return np.zeros((0, 4), np.int64)
    return np.concatenate([_ids([REFERENCE_TIME_SCALE * (1 + i)], np.arange(h), np.arange(w), [0])
                           for i, (h, w) in enumerate(grids)])


def reference_ids(n_ref: int) -> np.ndarray:
    """[n_ref, 4]: a sample reference set of n_ref tokens, one reference laid out as a 1 x n_ref grid."""
    return image_ids([(1, n_ref)])


def patchify_latents(latents):
    """[B, C, H, W] -> [B, 4C, H/2, W/2], each 2x2 patch's pixels as channels (_patchify_latents)."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unpatchify_latents(latents):
    """The inverse of patchify_latents (_unpatchify_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def pack_latents(latents):
    """[B, C, H, W] -> [B, H * W, C], row-major tokens (_pack_latents)."""
    b, c, h, w = latents.shape
    return latents.reshape(b, c, h * w).permute(0, 2, 1)
