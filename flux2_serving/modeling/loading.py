"""Load the FLUX.2 [klein] KV components with diffusers/transformers.

One code path for the embedded tiny checkpoint and for
`black-forest-labs/FLUX.2-klein-9b-kv` (a Hugging Face id or a local directory with the
same `save_pretrained` layout). Components load one at a time, so exporting the 9B model
never holds the text encoder and the transformer in memory together.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from diffusers import AutoencoderKLFlux2, Flux2KleinKVPipeline, Flux2Transformer2DModel
from transformers import AutoConfig, AutoTokenizer, Qwen3ForCausalLM

from ..contract.specs import model_dims
from .checkpoint import random_module

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_text_encoder(model: str, dtype: torch.dtype = torch.float32):
    return Qwen3ForCausalLM.from_pretrained(model, subfolder="text_encoder", dtype=dtype).eval()


def load_tokenizer(model: str):
    return AutoTokenizer.from_pretrained(model, subfolder="tokenizer")


def load_vae(model: str, dtype: torch.dtype = torch.float32):
    return AutoencoderKLFlux2.from_pretrained(model, subfolder="vae", dtype=dtype).eval()


def load_transformer(model: str, dtype: torch.dtype = torch.float32):
    return Flux2Transformer2DModel.from_pretrained(model, subfolder="transformer", dtype=dtype).eval()


def load_pipeline(model: str, dtype: torch.dtype = torch.float32):
    """The reference `Flux2KleinKVPipeline` (parity tests and benchmarks)."""
    return Flux2KleinKVPipeline.from_pretrained(model, dtype=dtype)


def read_model_dims(model: str) -> dict:
    """The sizes the I/O spec needs (specs.model_dims), plus the vocabulary size, from the configs."""
    if model.startswith("random:"):  # checkpoint.random_module's dims: read off modules built on the meta device
        size = model.split(":", 1)[1]
        text_cfg = random_module("text_encoder", size, torch.float32, "meta").config
        transformer_cfg = random_module("transformer", size, torch.float32, "meta").config
    else:
        text_cfg = AutoConfig.from_pretrained(model, subfolder="text_encoder")
        transformer_cfg = SimpleNamespace(**Flux2Transformer2DModel.load_config(model, subfolder="transformer"))
    dims = model_dims(text_cfg, transformer_cfg)
    dims["vocab_size"] = text_cfg.vocab_size
    return dims
