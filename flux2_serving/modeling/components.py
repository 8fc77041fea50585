"""One `torch.nn.Module` wrapper per exported component.

The wrappers call the diffusers/transformers modules; the only logic written here is the
KV split (prefill -> reference K/V, cached step <- reference K/V) and the tensor layout
glue that the pipeline does between components (patchify, batch-norm, packing). The I/O
contract of each graph is declared in `specs.py`.
"""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import torch
from diffusers import Flux2KleinKVPipeline
from diffusers.models.transformers import transformer_flux2
from diffusers.models.transformers.transformer_flux2 import Flux2KVCache

from ..contract.envelope import VAE_ATTENTION_QUERY_CHUNKS
from ..contract.graphs import GRAPHS
from ..contract.specs import TEXT_LAYERS
from .checkpoint import random_module
from .latent_layout import pack_latents, patchify_latents, unpatchify_latents
from .loading import load_text_encoder, load_transformer, load_vae

# The pipeline's static helpers are the single source of the latent layout.
_pipe = Flux2KleinKVPipeline


@contextlib.contextmanager
def float32_rope():
    """Compute RoPE frequencies in float32 instead of diffusers' float64.

    TensorRT has no DOUBLE type; positions here are small integers (< 1e4), for which
    float32 frequencies differ from float64 ones by ~1e-7 relative.
    """
    original = transformer_flux2.maybe_adjust_dtype_for_device
    transformer_flux2.maybe_adjust_dtype_for_device = lambda dtype, device: torch.float32
    try:
        yield
    finally:
        transformer_flux2.maybe_adjust_dtype_for_device = original


@contextlib.contextmanager
def query_chunked_attention(chunks: int = VAE_ATTENTION_QUERY_CHUNKS):
    """Export the VAE's attention one slice of queries at a time.

    The VAE's mid-block attention has a single head of width 512 over every latent pixel: exported as
    MatMul -> Softmax -> MatMul, a 2048x1024 profile maximum (32,768 tokens) would need a
    [1, 1, 32768, 32768] score tensor, 1.1e9 elements and 2-4 GiB (a square 2048x2048 profile: 4.3e9,
    over TensorRT's 2^31 - 1), unless TensorRT fuses it, which its fused attention kernels do not
    promise for a head this wide. Softmax is per query row, so `chunks` slices of the queries against
    all keys compute exactly the same rows, and only one slice's scores (here 2048 x 32768) is alive.
    Patches torch's scaled_dot_product_attention while the VAE graphs are traced; they call it without
    a mask, causal flag or dropout."""
    original = torch.nn.functional.scaled_dot_product_attention

    def chunked(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if attn_mask is not None or is_causal or dropout_p or kwargs:
            raise NotImplementedError("query_chunked_attention: the VAE's attention has no mask, causality or dropout")
        n = query.shape[-2]
        bounds = [(i * n) // chunks for i in range(chunks + 1)]
        return torch.cat([original(query[..., lo:hi, :], key, value, scale=scale)
                          for lo, hi in zip(bounds, bounds[1:], strict=False)], dim=-2)

    torch.nn.functional.scaled_dot_product_attention = chunked
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def use_kv_processors(transformer) -> None:
    """Install diffusers' KV-aware attention processors, as the KV pipeline does."""
    _pipe._set_kv_attn_processors(SimpleNamespace(transformer=transformer))


class TextEncoder(torch.nn.Module):
    """Qwen3 -> prompt_embeds, the stack of hidden states 9/18/27 that the pipeline builds.

    The model is truncated in place after the last used layer and its final norm is
    replaced by identity: `output_hidden_states` puts the *normed* output last, so keeping
    27 layers with the norm would change `hidden_states[27]`. The dropped layers and the
    LM head are dead weight for this pipeline.

    Token ids are clamped into the vocabulary before the embedding gather: an engine cannot refuse
    a value, and an out-of-range gather on a GPU is undefined behaviour (it can take the CUDA
    context, so the whole server, down). Identity for every valid id; the served runner and the
    BLS refuse invalid ones with INVALID_ARG before they get here.
    """

    def __init__(self, text_encoder, layers=TEXT_LAYERS):
        super().__init__()
        model = text_encoder.model
        keep = max(layers)
        model.layers = model.layers[:keep]
        model.config.num_hidden_layers = keep
        if getattr(model.config, "layer_types", None):
            model.config.layer_types = model.config.layer_types[:keep]
        model.norm = torch.nn.Identity()
        self.model = model
        self.layers = tuple(layers)

    def forward(self, input_ids, attention_mask):
        input_ids = input_ids.clamp(0, self.model.embed_tokens.num_embeddings - 1)
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False
        )
        stacked = torch.stack([out.hidden_states[k] for k in self.layers], dim=1)  # [B, 3, L, D]
        batch, layers, length, hidden = stacked.shape
        return stacked.permute(0, 2, 1, 3).reshape(batch, length, layers * hidden)


def _bn_stats(vae, like: torch.Tensor):
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


class VaeEncoder(torch.nn.Module):
    """Image in [-1, 1] -> packed, batch-norm-normalised reference tokens (argmax latents)."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, image):
        latents = self.vae.encode(image).latent_dist.mode()
        latents = patchify_latents(latents)
        mean, std = _bn_stats(self.vae, latents)
        return pack_latents((latents - mean) / std)


class VaeDecoder(torch.nn.Module):
    """Packed latents on their [h, w] grid -> image (batch-norm inverse, unpatchify, decode).

    `latents` is the packed token sequence `[B, h*w, 128]` viewed as `[B, h, w, 128]`
    (a free reshape for the caller): the graph needs h and w as shapes, not values.
    """

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latents):
        latents = latents.permute(0, 3, 1, 2)
        mean, std = _bn_stats(self.vae, latents)
        latents = unpatchify_latents(latents * std + mean)
        return self.vae.decode(latents, return_dict=False)[0]


def _split_kv(cache: Flux2KVCache) -> tuple[torch.Tensor, ...]:
    """Flux2KVCache (batch 1) -> one [2, N_ref, heads, head_dim] tensor per block, double blocks first."""
    layers = cache.double_block_caches + cache.single_block_caches
    return tuple(torch.stack(layer.get(), dim=0)[:, 0] for layer in layers)


def _cache_from(ref_kv, batch: int, num_double: int, num_single: int) -> Flux2KVCache:
    """One [2, N_ref, heads, head_dim] tensor per block -> a Flux2KVCache shared by `batch` samples."""
    cache = Flux2KVCache(num_double_layers=num_double, num_single_layers=num_single)
    cache.num_ref_tokens = ref_kv[0].shape[1]
    layers = cache.double_block_caches + cache.single_block_caches
    for layer, kv in zip(layers, ref_kv, strict=True):
        kv = kv.unsqueeze(1).expand(2, batch, *kv.shape[1:])  # a view: the images of a request share it
        layer.store(kv[0], kv[1])
    return cache


class _NoRows(torch.nn.Module):
    """Stands in for a text-stream layer in the prefill, which has no text tokens: the layer only ever
    sees zero rows (or, for the text modulation, shapes what multiplies zero rows), so zeros of its
    output width give the same result, without its weights."""

    def __init__(self, out_features: int):
        super().__init__()
        self.out_features = out_features

    def forward(self, x, *unused):
        return x.new_zeros(*x.shape[:-1], self.out_features)


class _Discarded(torch.nn.Module):
    """Stands in for the output norm: the prefill's output is discarded (only the K/V are kept)."""

    def forward(self, x, *unused):
        return x


def _shallow_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module` sharing its parameters, whose submodules can be replaced without touching it."""
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    return clone


def reference_stream_only(transformer):
    """`transformer` without what only text tokens or the final output use, for the prefill: the
    context embedder, the text modulation, every double block's text stream (added q/k/v, its
    output projection, its feed-forward) and the output norm and projection: ~1.9B of klein 9B's
    parameters. The reference tokens' K/V do not depend on them (references attend only to
    references, with the fixed timestep 0), and with no text token those layers see zero rows.
    A shallow copy: `transformer` itself keeps every layer (the cached step and diffusers share it)."""
    slim = _shallow_copy(transformer)
    inner = transformer.inner_dim
    slim.context_embedder = _NoRows(inner)
    slim.double_stream_modulation_txt = _NoRows(6 * inner)  # [shift, scale, gate] x 2 for zero text rows
    slim.norm_out, slim.proj_out = _Discarded(), _NoRows(transformer.proj_out.out_features)
    blocks = _shallow_copy(transformer.transformer_blocks)
    for index, block in enumerate(transformer.transformer_blocks):
        block = _shallow_copy(block)
        block.ff_context = _NoRows(inner)
        block.attn = _shallow_copy(block.attn)
        for name in ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"):
            setattr(block.attn, name, _NoRows(inner))
        blocks[index] = block
    slim.transformer_blocks = blocks
    return slim


class TransformerPrefill(torch.nn.Module):
    """Reference tokens alone -> post-RoPE K/V of every double and single block.

    In `kv_cache_mode="extract"` reference tokens attend only to reference tokens and are
    modulated with the fixed timestep 0, so their K/V depend on nothing else (docs/architecture.md,
    "How it fits together"). This runs diffusers' own extract forward over the references, a one-token dummy
    image and no text token, on the transformer without its text stream and output layers
    (reference_stream_only: ~1.9B parameters fewer at 9B), and keeps only the extracted K/V:
    equal to what diffusers extracts with any prompt and latents (tested).
    """

    def __init__(self, transformer):
        super().__init__()
        use_kv_processors(transformer)
        self.transformer = reference_stream_only(transformer)

    def forward(self, ref_latents, ref_ids):
        t = self.transformer
        dtype = ref_latents.dtype
        dummy_img = torch.zeros(1, 1, t.config.in_channels, dtype=dtype, device=ref_latents.device)
        no_txt = torch.zeros(1, 0, t.config.joint_attention_dim, dtype=dtype, device=ref_latents.device)
        dummy_ids = torch.zeros(1, 4, dtype=ref_ids.dtype, device=ref_ids.device)
        _, cache = t(
            hidden_states=torch.cat([ref_latents, dummy_img], dim=1),
            encoder_hidden_states=no_txt,
            timestep=torch.zeros(1, dtype=dtype, device=ref_latents.device),
            img_ids=torch.cat([ref_ids, dummy_ids], dim=0),
            txt_ids=dummy_ids[:0],
            guidance=None,
            return_dict=False,
            kv_cache_mode="extract",
            num_ref_tokens=ref_latents.shape[1],
        )
        return _split_kv(cache)


class TransformerCached(torch.nn.Module):
    """One denoising step given the reference K/V (diffusers' `kv_cache_mode="cached"`).

    The B samples are the images of one request: they share the request's K/V (one tensor per
    block, no batch axis, broadcast here), so neither the BLS nor the engine's profile holds B
    copies of it. Latents keep their latent grid (lat_h, lat_w) so the graph knows the grid.

    Text-to-image uses the same graph with N_ref = 0: an empty K/V adds nothing to the
    attention, so the step equals diffusers' plain forward (tested). This avoids a third
    full-size transformer engine; a TensorRT profile with min N_ref = 0 is the assumption
    to confirm on a GPU host (docs/runbook.md).
    """

    def __init__(self, transformer):
        super().__init__()
        use_kv_processors(transformer)
        self.transformer = transformer

    def forward(self, latents, prompt_embeds, timestep, img_ids, txt_ids, *ref_kv):
        t = self.transformer
        batch, lat_h, lat_w, channels = latents.shape
        cache = _cache_from(ref_kv, batch, len(t.transformer_blocks), len(t.single_transformer_blocks))
        noise_pred = t(
            hidden_states=latents.reshape(batch, lat_h * lat_w, channels),
            encoder_hidden_states=prompt_embeds,
            timestep=timestep,
            img_ids=img_ids.reshape(lat_h * lat_w, 4),
            txt_ids=txt_ids,
            guidance=None,
            return_dict=False,
            kv_cache=cache,
            kv_cache_mode="cached",
        )[0]
        return noise_pred.reshape(batch, lat_h, lat_w, channels)


WRAPPERS = {name: globals()[graph.wrapper] for name, graph in GRAPHS.items()}


def build(name: str, model: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.nn.Module:
    """Load the module(s) graph `name` needs from checkpoint `model` and wrap them, in eval mode.

    The ONNX exporter traces these modules; the `torch` serving flavor runs them as they are.
    `model` "random:9b" or "random:tiny" builds random weights of those dims on `device` instead
    (checkpoint.random_module: the GPU check serves klein 9B dims without downloading anything).
    """
    if model.startswith("random:"):
        return WRAPPERS[name](random_module(GRAPHS[name].module, model.split(":", 1)[1], dtype, device)).eval()
    loader = {"text_encoder": load_text_encoder, "vae": load_vae, "transformer": load_transformer}[GRAPHS[name].module]
    # Wrap on the CPU, then move: the text encoder drops its unused layers before reaching the GPU.
    return WRAPPERS[name](loader(model, dtype)).to(device).eval()
