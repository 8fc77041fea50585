"""The embedded tiny checkpoint is structurally the real FLUX.2 [klein] KV layout."""

from __future__ import annotations

import json

import torch

from flux2_serving.modeling.checkpoint import write_checkpoint
from flux2_serving.modeling.loading import load_text_encoder, load_tokenizer, load_transformer, load_vae


def test_layout(tiny_checkpoint):
    index = json.loads(open(f"{tiny_checkpoint}/model_index.json").read())
    assert index["_class_name"] == "Flux2KleinKVPipeline"
    for part in ("transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert part in index


def test_components_mirror_the_real_model(tiny_checkpoint):
    text_encoder = load_text_encoder(tiny_checkpoint)
    assert type(text_encoder).__name__ == "Qwen3ForCausalLM"
    assert text_encoder.config.num_hidden_layers >= 28  # hidden states 9/18/27 exist, 28+ is dead weight
    transformer = load_transformer(tiny_checkpoint).config
    assert transformer.num_layers >= 2 and transformer.num_single_layers >= 2
    assert transformer.guidance_embeds is False and transformer.in_channels == 128
    assert sum(transformer.axes_dims_rope) == transformer.attention_head_dim
    assert transformer.joint_attention_dim == 3 * text_encoder.config.hidden_size
    vae = load_vae(tiny_checkpoint)
    assert tuple(vae.config.patch_size) == (2, 2) and vae.config.latent_channels == 32
    assert vae.bn.running_mean.abs().mean() > 0.1  # non-trivial batch-norm statistics
    assert (vae.bn.running_var - 1).abs().mean() > 0.1


def test_tokenizer_chat_template(tiny_checkpoint):
    tokenizer = load_tokenizer(tiny_checkpoint)
    assert type(tokenizer).__name__ in ("Qwen2Tokenizer", "Qwen2TokenizerFast")
    messages = [{"role": "user", "content": "a cat"}]
    off = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    on = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert off == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert on == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer(off)["input_ids"]
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") in ids
    assert tokenizer.decode(ids) == off


def test_deterministic_from_seed(tmp_path):
    a = write_checkpoint(tmp_path / "a", seed=3)
    b = write_checkpoint(tmp_path / "b", seed=3)
    c = write_checkpoint(tmp_path / "c", seed=4)
    for part in ("transformer", "vae", "text_encoder"):
        wa, wb, wc = (load_fn(str(p)).state_dict() for p, load_fn in
                      ((a, LOADERS[part]), (b, LOADERS[part]), (c, LOADERS[part])))
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert not all(torch.equal(wa[k], wc[k]) for k in wa)


LOADERS = {"transformer": load_transformer, "vae": load_vae, "text_encoder": load_text_encoder}
