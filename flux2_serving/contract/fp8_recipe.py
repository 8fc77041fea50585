"""The FP8 recipe's layer lists, shared by the FP8 export (export/fp8.py, ONNX Q/DQ) and the torch
flavor's FP8 layers (models/fp8_linear.py): which linear layers stay in high precision. Standard library."""

from __future__ import annotations

import re
from collections.abc import Iterable

# The FLUX transformer layers kept in high precision. These follow NVIDIA Model Optimizer's diffusers
# example (github.com/NVIDIA/Model-Optimizer, examples/diffusers/quantization/utils.py,
# `filter_func_flux_dev`, which models_utils.py applies to both FLUX.1-dev and FLUX.2-dev): the final
# `proj_out`, and everything under time_text_embed, context_embedder, x_embedder, norm_out,
# time_guidance_embed and *stream_modulation. Checked against diffusers 0.42.1's Flux2Transformer2DModel:
# its embedders are x_embedder, context_embedder and time_guidance_embed.{timestep,guidance}_embedder;
# its modulation layers are double_stream_modulation_img, double_stream_modulation_txt and
# single_stream_modulation (shared by all blocks, where FLUX.1 had one per block); the output
# head is norm_out.linear (AdaLayerNormContinuous) and proj_out; FLUX.2 has no time_text_embed, kept
# for FLUX.1 names. The norms themselves (LayerNorm, RMSNorm) are not linear layers and stay as they
# are anyway. Patterns match whole dotted components anywhere in a qualified name, so that they also
# hold under a wrapper (`transformer.proj_out`); `proj_out` matches only the model's own output head
# (FLUX.2's single blocks name theirs `attn.to_out`).
TRANSFORMER_KEEP = (
    r"(^|\.)x_embedder(\.|$)",
    r"(^|\.)context_embedder(\.|$)",
    r"(^|\.)time_text_embed(\.|$)",
    r"(^|\.)time_guidance_embed(\.|$)",
    r"(^|\.)\w*stream_modulation\w*(\.|$)",
    r"(^|\.)norm_out(\.|$)",
    r"(^|\.)proj_out(\.|$)",
)
# The Qwen3 text encoder: every decoder linear goes to FP8 (our choice; no NVIDIA recipe covers it); the LM
# head, should one be present, stays (the served wrapper drops it: it is dead weight for this pipeline).
TEXT_ENCODER_KEEP = (r"(^|\.)lm_head(\.|$)",)
# Which keep list a served component's swap uses; the VAE graphs are not swapped at all.
KEEP = {"transformer": TRANSFORMER_KEEP, "text_encoder": TEXT_ENCODER_KEEP}


def kept(name: str, patterns: Iterable[str]) -> bool:
    """Whether the layer (or quantizer) of qualified name `name` stays in high precision (re.search)."""
    return any(re.search(pattern, name) for pattern in patterns)
