"""Write a small random FLUX.2 [klein] KV checkpoint with the exact diffusers layout.

Model weights cannot be downloaded on the machines this project is developed and tested
on, so the embedded default is a scaled-down, randomly initialised
`Flux2KleinKVPipeline` saved with `save_pretrained`. It is structurally the real thing:

* a Qwen3 text encoder with 28 layers, so `hidden_states[9/18/27]` exist and layer 28
  is present (and dead weight, as in the 36-layer original);
* a byte-level BPE `Qwen2TokenizerFast` with a Qwen-style chat template that honours
  `enable_thinking`;
* an `AutoencoderKLFlux2` with 2x2 patchify and non-trivial batch-norm running stats;
* a `Flux2Transformer2DModel` with 2 double and 2 single blocks, 128 input channels,
  4 RoPE axes and `guidance_embeds=False`.

The same seed always writes the same weights. Usage::

    python -m flux2_serving.modeling.checkpoint --out checkpoints/tiny [--seed 0]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..contract.cli_help import HelpFormatter
from ..contract.cli_help import prog as cli_prog

# torch, diffusers, transformers and tokenizers are imported in the functions that build modules: heavy,
# and optional for this module's other users (--help; the memory plan reads the 9B dims from here).
if TYPE_CHECKING:
    import torch


# A Qwen-style ChatML template: with `add_generation_prompt=True, enable_thinking=False`
# it ends with an empty think block, as the real Qwen3 template does.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Scaled-down sizes. The real 9B model: Qwen3 hidden 4096 x 36 layers, transformer
# 32 heads x 128, 8 double + 24 single blocks, VAE channels (128, 256, 512, 512).
TEXT_HIDDEN = 64
TEXT_LAYERS = 28
VAE_CHANNELS = (16, 32, 32, 32)
# Transformer (heads, head_dim = sum of the 4 RoPE axes). "tiny" is for tests; "bench" is for
# `make bench`: width 512, so that per-token linear layers weigh against attention roughly as at
# 9B (width 4096) instead of attention and per-call overheads dominating.
TRANSFORMER_SIZES = {"tiny": (4, 16), "bench": (8, 64)}


# klein 9B (dims only; the weights come from black-forest-labs/FLUX.2-klein-9b-kv). The transformer
# config's other keys are diffusers' defaults, which the released config uses (patch 1, timestep
# channels 256, eps 1e-6). The text encoder is Qwen3-8B; the VAE is AutoencoderKLFlux2's defaults.
KLEIN_9B_TRANSFORMER = dict(
    patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
    num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
    axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, eps=1e-6, guidance_embeds=False,
)
KLEIN_9B_TEXT_ENCODER = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rope_theta=1000000.0,
    tie_word_embeddings=False,
)


def build_tokenizer():
    """A byte-level BPE Qwen2 tokenizer: every byte is a token, plus ChatML specials."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2TokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|endoftext|>": 0}
    for ch in alphabet:
        vocab[ch] = len(vocab)
    tokenizer = Qwen2TokenizerFast(vocab=vocab, merges=[])
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.model_max_length = 131072
    return tokenizer


def build_text_encoder(vocab_size: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=2 * TEXT_HIDDEN,
        num_hidden_layers=TEXT_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        rope_theta=1000000.0,
        tie_word_embeddings=False,
    )
    return Qwen3ForCausalLM(config).eval()


def build_vae():
    import torch
    from diffusers import AutoencoderKLFlux2


    vae = AutoencoderKLFlux2(
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=32,
        norm_num_groups=8,
        sample_size=256,
    )
    # Non-trivial batch-norm statistics, so that a missing (de)normalisation shows.
    channels = vae.bn.running_mean.shape[0]
    vae.bn.running_mean.copy_(0.5 * torch.randn(channels))
    vae.bn.running_var.copy_(0.5 + torch.rand(channels))
    return vae.eval()


def build_transformer(size: str = "tiny"):
    from diffusers import Flux2Transformer2DModel

    heads, head_dim = TRANSFORMER_SIZES[size]
    return Flux2Transformer2DModel(
        patch_size=1,
        in_channels=128,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=3 * TEXT_HIDDEN,
        timestep_guidance_channels=256,
        mlp_ratio=3.0,
        axes_dims_rope=(head_dim // 4,) * 4,
        rope_theta=2000,
        guidance_embeds=False,
    ).eval()


def build_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type="exponential",
    )


# Seeds of `random_module`: each component is built from its own seed, so a component built in one
# process (a served model) has exactly the weights of the same component built in another.
RANDOM_SEEDS = {"text_encoder": 1, "vae": 2, "transformer": 3}


def random_module(kind: str, size: str, dtype: torch.dtype, device: str = "cpu"):
    """A randomly initialised component ("text_encoder", "vae" or "transformer") of klein 9B dims
    (`size` "9b") or of the tiny checkpoint's (`size` "tiny"), built directly on `device` in `dtype`
    (no fp32 copy, nothing read from disk). Deterministic for a given device type and dtype."""
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    default_dtype = torch.get_default_dtype()
    torch.manual_seed(RANDOM_SEEDS[kind])
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device), torch.no_grad():
            if kind == "text_encoder":
                module = (Qwen3ForCausalLM(Qwen3Config(**KLEIN_9B_TEXT_ENCODER)) if size == "9b"
                          else build_text_encoder(vocab_size=max(512, len(build_tokenizer()))))
            elif kind == "vae":
                module = AutoencoderKLFlux2() if size == "9b" else build_vae()
            else:
                module = Flux2Transformer2DModel(**KLEIN_9B_TRANSFORMER) if size == "9b" else build_transformer(size)
    finally:
        torch.set_default_dtype(default_dtype)
    return module.eval()


def build_pipeline(seed: int = 0, size: str = "tiny"):
    """Build the small random `Flux2KleinKVPipeline` in memory (deterministic from `seed`)."""
    import torch
    from diffusers import Flux2KleinKVPipeline

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    with torch.no_grad():
        text_encoder = build_text_encoder(vocab_size=max(512, len(tokenizer)))
        vae = build_vae()
        transformer = build_transformer(size)
    return Flux2KleinKVPipeline(
        scheduler=build_scheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )


def write_checkpoint(out: str | Path, seed: int = 0, size: str = "tiny") -> Path:
    """Save the small pipeline to `out` with `save_pretrained` and return the path."""
    out = Path(out)
    pipe = build_pipeline(seed, size)
    pipe.save_pretrained(out)
    (out / "TINY_CHECKPOINT.json").write_text(json.dumps({"seed": seed, "size": size, "random": True}) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=cli_prog("flux2_serving.modeling.checkpoint"), formatter_class=HelpFormatter,
        description="Write a small random Flux2KleinKVPipeline checkpoint (diffusers layout).",
        epilog="example:\n  python -m flux2_serving.modeling.checkpoint --out checkpoints/tiny",
    )
    parser.add_argument("--out", required=True, help="directory to write (model_index.json and subfolders)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    parser.add_argument("--size", choices=sorted(TRANSFORMER_SIZES), default="tiny",
                        help="transformer width: tiny (tests, 4x16) or bench (make bench, 8x64); default tiny")
    args = parser.parse_args(argv)
    path = write_checkpoint(args.out, args.seed, args.size)
    print(f"wrote {args.size} Flux2KleinKVPipeline checkpoint (seed {args.seed}) to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
