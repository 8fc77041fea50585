"""The token layout the served pipeline and the export use (export/latent_layout.py) equals what
diffusers' private helpers produce on the pinned diffusers: the day an upgrade changes them, this fails
and names the helper, instead of the served images drifting."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline as P

from flux2_serving.export import latent_layout as layout


def test_the_pinned_diffusers_is_the_one_the_layout_was_checked_against():
    assert diffusers.__version__ == layout.DIFFUSERS_VERSION


@pytest.mark.parametrize("length", [1, 7, 512])
def test_text_ids(length):
    expected = P._prepare_text_ids(torch.zeros(1, length, 8))[0]
    assert np.array_equal(layout.text_ids(length), expected.numpy())


@pytest.mark.parametrize("height, width", [(1, 1), (4, 6), (64, 48)])
def test_grid_ids(height, width):
    expected = P._prepare_latent_ids(torch.zeros(2, 128, height, width))
    assert np.array_equal(layout.grid_ids(height, width).reshape(-1, 4), expected[0].numpy())
    assert np.array_equal(expected[0], expected[1])  # every sample of a batch shares them


@pytest.mark.parametrize("grids", [[(4, 4)], [(2, 3), (5, 1), (4, 4)], [(1, 9)] * 4])
def test_image_ids(grids):
    expected = P._prepare_image_ids([torch.zeros(1, 128, h, w) for h, w in grids])[0]
    assert np.array_equal(layout.image_ids(grids), expected.numpy())
    n = sum(h * w for h, w in grids)
    assert np.array_equal(layout.reference_ids(n), P._prepare_image_ids([torch.zeros(1, 128, 1, n)])[0].numpy())


def test_latent_reshapes():
    latents = torch.randn(2, 32, 6, 10, generator=torch.Generator().manual_seed(0))
    patched = layout.patchify_latents(latents)
    assert torch.equal(patched, P._patchify_latents(latents))
    assert torch.equal(layout.unpatchify_latents(patched), P._unpatchify_latents(patched))
    assert torch.equal(layout.unpatchify_latents(patched), latents)
    assert torch.equal(layout.pack_latents(patched), P._pack_latents(patched))
