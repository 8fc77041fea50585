"""The token layout the served pipeline and the export use (flux2_serving/modeling/latent_layout.py), and the reference
sizes it computes from image headers (models/request_inputs.py preprocessed_size), equal what
diffusers' private helpers produce on the pinned diffusers: the day an upgrade changes them, this fails
and names the helper, instead of the served images drifting."""

from __future__ import annotations

from dataclasses import replace

import diffusers
import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline as P
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from PIL import Image

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.interface import Limits
from flux2_serving.modeling import latent_layout as layout
from flux2_serving.models.request_inputs import preprocess_reference, preprocessed_size

LIMITS = Limits(**DEFAULT_ENVELOPE.request_limits())


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


def _sizes(area_cap: int, count: int, seed: int) -> list[tuple[int, int]]:
    """`count` random (width, height) around and over `area_cap`, aspect ratios up to 4:1 either way."""
    rng = np.random.default_rng(seed)
    side = int(area_cap ** 0.5)
    widths = rng.integers(side // 4, side * 3, count)
    ratios = np.exp(rng.uniform(-np.log(4), np.log(4), count))
    return [(int(w), max(16, int(w * r))) for w, r in zip(widths, ratios, strict=True)]


@pytest.mark.parametrize("area_cap, sizes", [
    (64 * 64, _sizes(64 * 64, 150, 0)),  # small caps: many sizes, each resize cheap
    (100 * 100, _sizes(100 * 100, 150, 1)),
    (257 * 255, _sizes(257 * 255, 100, 2)),
    (LIMITS.reference_max_area, [(4096, 4096), (1025, 1024), (1024, 1025), (1500, 1100), (2048, 512), (512, 2048),
                                 (1448, 725), (3001, 1999), (1024, 1024), (1040, 1008), (250, 200)]),
])
def test_reference_sizes_from_headers_equal_diffusers_preprocessing(area_cap, sizes):
    """preprocessed_size (two integers, no pixels) against the served preprocessing itself
    (Flux2ImageProcessor._resize_to_target_area, then the crop to multiples of 16) on real images."""
    limits = replace(LIMITS, reference_max_area=area_cap)
    processor = Flux2ImageProcessor(vae_scale_factor=16)
    for width, height in sizes:
        pixels = preprocess_reference(Image.new("L", (width, height)), processor, limits)
        assert preprocessed_size(width, height, limits) == tuple(pixels.shape[-2:]), (width, height, area_cap)
