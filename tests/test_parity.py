"""Each exported graph, run in onnxruntime, against the diffusers/transformers module(s).

fp32 on CPU, the tiny checkpoint, random inputs at two shapes per graph. Bound: relative L2
error <= 1e-4 (measured ~1e-7 to 1e-6; see the assertion messages with -v).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import Flux2KleinKVPipeline as P
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

from flux2_serving.modeling.components import TransformerPrefill
from flux2_serving.models.pipeline import tokenize  # the served tokenization, the one tested here
from tests.support import rel_l2, run_graph

TOL = 1e-4


@pytest.mark.parametrize("prompts, max_len", [(["a red fox in the snow"], 512),
                                              (["cat", "a much longer prompt about a dog", "ok"], 40)])
def test_text_encoder(pipe, ort_session, prompts, max_len):
    ids, mask = tokenize(pipe.tokenizer, prompts, max_len)
    (actual,) = run_graph(ort_session("text_encoder"), input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        expected = P._get_qwen3_prompt_embeds(pipe.text_encoder, pipe.tokenizer, prompts,
                                              max_sequence_length=max_len)
    assert rel_l2(actual, expected) <= TOL


@pytest.mark.parametrize("batch, height, width", [(1, 64, 96), (2, 128, 64)])
def test_vae_encoder(pipe, ort_session, batch, height, width):
    image = torch.rand(batch, 3, height, width, generator=torch.Generator().manual_seed(height)) * 2 - 1
    (actual,) = run_graph(ort_session("vae_encoder"), image=image)
    with torch.no_grad():
        expected = P._pack_latents(pipe._encode_vae_image(image, generator=None))
    assert actual.shape == (batch, height // 16 * width // 16, 128)
    assert rel_l2(actual, expected) <= TOL


@pytest.mark.parametrize("batch, lat_h, lat_w", [(1, 4, 6), (3, 5, 3)])
def test_vae_decoder(pipe, ort_session, batch, lat_h, lat_w):
    latents = torch.randn(batch, lat_h * lat_w, 128, generator=torch.Generator().manual_seed(lat_w))
    (actual,) = run_graph(ort_session("vae_decoder"), latents=latents.reshape(batch, lat_h, lat_w, 128))
    # The pipeline's own decode path after the denoising loop.
    ids = P._prepare_latent_ids(torch.zeros(batch, 128, lat_h, lat_w))
    with torch.no_grad():
        unpacked = P._unpack_latents_with_ids(latents, ids)
        mean = pipe.vae.bn.running_mean.view(1, -1, 1, 1)
        std = torch.sqrt(pipe.vae.bn.running_var.view(1, -1, 1, 1) + pipe.vae.config.batch_norm_eps)
        expected = pipe.vae.decode(P._unpatchify_latents(unpacked * std + mean), return_dict=False)[0]
    assert actual.shape == (batch, 3, 16 * lat_h, 16 * lat_w)
    assert rel_l2(actual, expected) <= TOL


# ---------------------------------------------------------------- transformer: the KV split


def _references(sizes, seed=0):
    """Packed reference tokens [1, N_ref, 128] and their ids for references of latent `sizes`."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(1, 128, h, w, generator=g) for h, w in sizes]
    tokens = torch.cat([P._pack_latents(x) for x in latents], dim=1)
    return tokens, P._prepare_image_ids(latents)[0]


def _step_inputs(batch, lat_h, lat_w, text_len, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, lat_h * lat_w, 128, generator=g)
    embeds = torch.randn(batch, text_len, 192, generator=g)
    img_ids = P._prepare_latent_ids(torch.zeros(batch, 128, lat_h, lat_w))[0]
    txt_ids = P._prepare_text_ids(embeds)[0]
    return latents, embeds, img_ids, txt_ids


def _diffusers_kv(cache: Flux2KVCache) -> np.ndarray:
    layers = cache.double_block_caches + cache.single_block_caches
    return np.stack([np.stack([layer.k_ref[0].numpy(), layer.v_ref[0].numpy()]) for layer in layers])


def _prefill(ort_session, refs, ref_ids) -> np.ndarray:
    """The prefill graph's per-block K/V, stacked [NL, 2, N_ref, heads, head_dim] for comparison."""
    return np.stack(run_graph(ort_session("transformer_prefill"), ref_latents=refs, ref_ids=ref_ids))


def _cached_feeds(latents, embeds, sigma, img_ids, txt_ids, ref_kv, lat_h, lat_w):
    """The cached graph's layout from the pipeline's: [B, lat_h, lat_w, C] latents, ids on the grid,
    one K/V tensor per block shared by the batch (as the BLS sends them)."""
    batch = latents.shape[0]
    kv = {f"ref_kv_{index:02d}": np.ascontiguousarray(layer) for index, layer in enumerate(np.asarray(ref_kv))}
    return dict(latents=latents.reshape(batch, lat_h, lat_w, -1), prompt_embeds=embeds,
                timestep=torch.full((batch,), sigma), img_ids=img_ids.reshape(lat_h, lat_w, 4), txt_ids=txt_ids, **kv)


def _run_cached(session, *args):
    (noise_pred,) = run_graph(session, **_cached_feeds(*args))
    return noise_pred.reshape(noise_pred.shape[0], -1, noise_pred.shape[-1])


@pytest.mark.parametrize("ref_sizes, batch, lat_h, lat_w, text_len", [
    ([(4, 4)], 1, 4, 6, 512),                       # one reference
    ([(4, 6), (3, 3), (5, 2)], 2, 3, 5, 24),        # three references of different sizes, batch 2
])
def test_prefill_and_cached_reproduce_extract_and_cached(pipe, ort_session, ref_sizes, batch, lat_h, lat_w, text_len):
    """prefill + cached step == diffusers' step-0 `extract` output and its later `cached` outputs."""
    transformer = pipe.transformer  # KV attention processors installed by the pipeline
    refs, ref_ids = _references(ref_sizes)
    latents, embeds, img_ids, txt_ids = _step_inputs(batch, lat_h, lat_w, text_len)

    ref_kv = _prefill(ort_session, refs, ref_ids)
    cached = ort_session("transformer_cached")

    with torch.no_grad():
        expected0, cache = transformer(
            hidden_states=torch.cat([refs.expand(batch, -1, -1), latents], 1), encoder_hidden_states=embeds,
            timestep=torch.full((batch,), 0.9), img_ids=torch.cat([ref_ids, img_ids]), txt_ids=txt_ids,
            guidance=None, return_dict=False, kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
    assert rel_l2(ref_kv, _diffusers_kv(cache)) <= TOL
    actual0 = _run_cached(cached, latents, embeds, 0.9, img_ids, txt_ids, ref_kv, lat_h, lat_w)
    assert rel_l2(actual0, expected0) <= TOL

    for sigma, seed in ((0.6, 2), (0.3, 3)):
        step_latents = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            expected = transformer(hidden_states=step_latents, encoder_hidden_states=embeds,
                                   timestep=torch.full((batch,), sigma), img_ids=img_ids, txt_ids=txt_ids,
                                   guidance=None, return_dict=False, kv_cache=cache, kv_cache_mode="cached")[0]
        actual = _run_cached(cached, step_latents, embeds, sigma, img_ids, txt_ids, ref_kv, lat_h, lat_w)
        assert rel_l2(actual, expected) <= TOL


def test_prefill_ignores_text_and_image(pipe, ort_session):
    """The prefill graph equals K/V extracted beside a different prompt, latents and timestep."""
    refs, ref_ids = _references([(3, 4)], seed=5)
    latents, embeds, img_ids, txt_ids = _step_inputs(1, 2, 3, 9, seed=6)
    with torch.no_grad():
        _, cache = pipe.transformer(
            hidden_states=torch.cat([refs, latents], 1), encoder_hidden_states=embeds * 3,
            timestep=torch.full((1,), 0.25), img_ids=torch.cat([ref_ids, img_ids]), txt_ids=txt_ids,
            guidance=None, return_dict=False, kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
    ref_kv = _prefill(ort_session, refs, ref_ids)
    assert ref_kv.shape == (4, 2, 12, 4, 16)
    assert rel_l2(ref_kv, _diffusers_kv(cache)) <= TOL


def test_the_slim_prefill_extracts_exactly_what_diffusers_does(pipe):
    """The prefill module (no text stream, no output layers) gives bit-identical K/V to diffusers'
    extract forward with a prompt and latents; the pipeline's transformer keeps every layer."""
    refs, ref_ids = _references([(4, 6), (3, 3)], seed=8)
    latents, embeds, img_ids, txt_ids = _step_inputs(1, 2, 3, 11, seed=9)
    transformer = pipe.transformer
    with torch.no_grad():
        _, cache = transformer(
            hidden_states=torch.cat([refs, latents], 1), encoder_hidden_states=embeds,
            timestep=torch.full((1,), 0.5), img_ids=torch.cat([ref_ids, img_ids]), txt_ids=txt_ids,
            guidance=None, return_dict=False, kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
        prefill = TransformerPrefill(transformer).eval()
        ours = np.stack([kv.numpy() for kv in prefill(refs, ref_ids)])
    assert np.array_equal(ours, _diffusers_kv(cache))  # exact, not within a tolerance
    full, slim = (sum(p.numel() for p in m.parameters()) for m in (transformer, prefill))
    assert slim < 0.75 * full, (slim, full)
    assert isinstance(transformer.transformer_blocks[0].attn.add_q_proj, torch.nn.Linear)  # untouched


@pytest.mark.parametrize("batch, lat_h, lat_w, text_len", [(1, 4, 4, 512), (3, 2, 5, 17)])
def test_cached_without_references_is_the_plain_forward(pipe, ort_session, batch, lat_h, lat_w, text_len):
    """Text-to-image: the cached-step graph with N_ref = 0 equals diffusers' no-KV forward."""
    latents, embeds, img_ids, txt_ids = _step_inputs(batch, lat_h, lat_w, text_len, seed=7)
    empty_kv = np.zeros((4, 2, 0, 4, 16), dtype=np.float32)
    actual = _run_cached(ort_session("transformer_cached"), latents, embeds, 0.7, img_ids, txt_ids, empty_kv,
                         lat_h, lat_w)
    with torch.no_grad():
        expected = pipe.transformer(hidden_states=latents, encoder_hidden_states=embeds,
                                    timestep=torch.full((batch,), 0.7), img_ids=img_ids, txt_ids=txt_ids,
                                    guidance=None, return_dict=False)[0]
    assert rel_l2(actual, expected) <= TOL


def test_cached_batch_sharing_kv_equals_each_sample_alone(pipe, ort_session):
    """What the BLS relies on: the images of a request (different latents, here also different
    prompts and timesteps) share one K/V in one call and give what each gives alone in diffusers."""
    lat_h, lat_w, text_len = 3, 4, 20
    latents, embeds, img_ids, txt_ids = _step_inputs(3, lat_h, lat_w, text_len, seed=8)
    sigmas = (0.8, 0.35, 0.5)
    refs, ref_ids = _references([(4, 1), (2, 2)], seed=10)
    expected = []
    for sample in range(3):
        with torch.no_grad():
            _, cache = pipe.transformer(
                hidden_states=torch.cat([refs, latents[sample:sample + 1]], 1),
                encoder_hidden_states=embeds[sample:sample + 1], timestep=torch.full((1,), 0.9),
                img_ids=torch.cat([ref_ids, img_ids]), txt_ids=txt_ids, guidance=None, return_dict=False,
                kv_cache_mode="extract", num_ref_tokens=refs.shape[1])
            expected.append(pipe.transformer(
                hidden_states=latents[sample:sample + 1], encoder_hidden_states=embeds[sample:sample + 1],
                timestep=torch.full((1,), sigmas[sample]), img_ids=img_ids, txt_ids=txt_ids, guidance=None,
                return_dict=False, kv_cache=cache, kv_cache_mode="cached")[0])
    feeds = _cached_feeds(latents, embeds, 0.0, img_ids, txt_ids, _prefill(ort_session, refs, ref_ids), lat_h, lat_w)
    feeds["timestep"] = torch.tensor(sigmas)
    (actual,) = run_graph(ort_session("transformer_cached"), **feeds)
    assert rel_l2(actual.reshape(3, lat_h * lat_w, -1), torch.cat(expected)) <= TOL
