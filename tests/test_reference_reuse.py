"""Reference K/V reuse across requests and one K/V per request, through a real tritonserver.

The server fixture runs 4 BLS instances sharing one 1 MiB cache (the reference_kv_cache model,
conftest); the tiny model's K/V is 2 KiB per reference token (4 layers x K,V x 4 heads x 16 x
fp32), so a 256x256 reference (256 tokens) takes 512 KiB: two fit.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from flux2_serving.clients.api import Flux2Client
from flux2_serving.devtools.metrics import reference_cache_metrics
from flux2_serving.devtools.pictures import synthetic_reference
from tests.support import BLS_INSTANCES, CACHE_BYTES, model_counts


def cache_metrics(server) -> dict[str, float]:
    return reference_cache_metrics(server["metrics"])


def edit(server, references, seed=1, **kwargs) -> np.ndarray:
    with Flux2Client(server["grpc"]) as client:
        images = client.generate("paint it like a mosaic", references, height=256, width=256, seed=seed,
                                 num_inference_steps=2, **kwargs)
    return np.stack([np.asarray(image) for image in images])


def test_hit_skips_prefill_and_gives_the_identical_image(triton_server):
    refs = [synthetic_reference((256, 256), 7), synthetic_reference((128, 192), 99)]
    fresh = edit(triton_server, refs, reuse_reference_cache=False)
    before = cache_metrics(triton_server)
    prefill_before = model_counts(triton_server, "transformer_prefill")[0]
    results = [edit(triton_server, refs) for _ in range(BLS_INSTANCES + 1)]  # every BLS instance sees it
    after = cache_metrics(triton_server)
    prefills = model_counts(triton_server, "transformer_prefill")[0] - prefill_before
    hits, misses = after["hits_total"] - before["hits_total"], after["misses_total"] - before["misses_total"]
    print(f"hits {hits}, misses {misses}, prefills {prefills}")
    assert (misses, hits) == (1, BLS_INSTANCES)  # one cache shared by all BLS instances
    assert prefills == 1  # a hit ran neither the VAE encoder nor the prefill
    for result in results:
        assert np.array_equal(result, fresh)  # bit-identical on CPU, hit or miss
    assert 352 * 2048 <= after["bytes"] <= CACHE_BYTES  # this entry: 352 reference tokens x 2 KiB


def test_opt_out_neither_reads_nor_stores(triton_server):
    refs = [synthetic_reference((256, 256), 123)]
    before = cache_metrics(triton_server)
    prefill_before = model_counts(triton_server, "transformer_prefill")[0]
    for _ in range(3):
        edit(triton_server, refs, reuse_reference_cache=False)
    after = cache_metrics(triton_server)
    assert model_counts(triton_server, "transformer_prefill")[0] - prefill_before == 3
    assert after["hits_total"] == before["hits_total"] and after["misses_total"] == before["misses_total"]


def test_one_kv_per_request_shared_by_its_images(triton_server):
    refs = [synthetic_reference((256, 256), 11), synthetic_reference((192, 128), 12)]
    names = ("vae_encoder", "transformer_prefill", "transformer_cached", "vae_decoder")
    before = {name: model_counts(triton_server, name) for name in names}
    images = edit(triton_server, refs, seed=4, num_images_per_prompt=3, reuse_reference_cache=False)
    delta = {name: tuple(a - b for a, b in zip(model_counts(triton_server, name), before[name], strict=True))
             for name in names}
    print(delta)
    assert images.shape == (3, 256, 256, 3)
    assert delta["vae_encoder"][0] == 2  # once per reference, not per image
    assert delta["transformer_prefill"] == (1, 1)  # one K/V, at batch 1
    # 2 steps x 3 images in calls of at most 2 (the engine's batch) sharing the one K/V; one decode per image.
    assert delta["transformer_cached"] == (4, 4) and delta["vae_decoder"] == (3, 3)
    assert not np.array_equal(images[0], images[1])  # distinct noise per image


def test_eviction_under_a_small_budget_never_returns_a_wrong_image(triton_server):
    """Reference sets of 512 KiB each through a 1 MiB cache, in an order that both hits and evicts;
    every result equals the same request with the cache bypassed."""
    sets = [[synthetic_reference((256, 256), 20 * i + 5)] for i in range(4)]
    expected = [edit(triton_server, refs, seed=i, reuse_reference_cache=False) for i, refs in enumerate(sets)]
    order = [0, 1, 0, 2, 0, 3, 1, 0]  # LRU: hits at the 3rd and 5th request, 4 evictions after the 2nd
    before = cache_metrics(triton_server)
    for i in order:
        assert np.array_equal(edit(triton_server, sets[i], seed=i), expected[i])
    after = cache_metrics(triton_server)
    delta = {k: after[k] - before.get(k, 0) for k in ("hits_total", "misses_total", "evictions_total")}
    print(delta, after["bytes"])
    assert delta["hits_total"] == 2 and delta["misses_total"] == 6
    assert delta["evictions_total"] >= 4  # plus whatever earlier tests had left in the cache
    assert after["bytes"] <= CACHE_BYTES and after["entries"] == 2


def test_repeated_bytes_are_not_decoded_and_give_the_identical_image(triton_server):
    """First-level key: the same encoded bytes again skip decoding, preprocessing and the pixel hash."""
    refs = [synthetic_reference((256, 256), 41)]
    fresh = edit(triton_server, refs, seed=6, reuse_reference_cache=False)
    before = cache_metrics(triton_server)
    results = [edit(triton_server, refs, seed=6) for _ in range(2 * BLS_INSTANCES + 1)]
    after = cache_metrics(triton_server)
    not_decoded = after.get("encoded_key_hits_total", 0) - before.get("encoded_key_hits_total", 0)
    print(f"encoded-key hits {not_decoded} of {len(results) - 1} repeats")
    assert not_decoded >= 1  # each BLS instance keeps its own map: a repeat on another instance decodes
    assert after["hits_total"] - before["hits_total"] == len(results) - 1
    for result in results:
        assert np.array_equal(result, fresh)


def test_the_same_picture_as_png_and_lossless_webp_shares_the_kv(triton_server):
    png = synthetic_reference((256, 256), 77)
    buffer = io.BytesIO()
    Image.open(io.BytesIO(png)).save(buffer, format="WEBP", lossless=True)
    webp = buffer.getvalue()
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(webp)).convert("RGB")),
                          np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
    before = cache_metrics(triton_server)
    prefill_before = model_counts(triton_server, "transformer_prefill")[0]
    from_png = edit(triton_server, [png], seed=8)
    from_webp = edit(triton_server, [webp], seed=8)
    after = cache_metrics(triton_server)
    assert after["misses_total"] - before["misses_total"] == 1
    assert after["hits_total"] - before["hits_total"] == 1  # other bytes, same pixels: the pixel key hits
    assert model_counts(triton_server, "transformer_prefill")[0] - prefill_before == 1
    assert np.array_equal(from_png, from_webp)
