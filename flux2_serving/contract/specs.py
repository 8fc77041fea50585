"""The declared I/O spec of every exported graph: names, dims and dtypes.

The exporter, the engine builder's profiles, Triton's config.pbtxt and the memory plan derive
from it. Standard library only, so the engine builder and the memory plan run where neither
torch nor diffusers is installed (e.g. inside NVIDIA's TensorRT container).

I/O contract (B images of one request, L text tokens, N_ref reference tokens of the whole
ordered reference set, h/w the packed latent grid, H = 16h and W = 16w in pixels, NL = double
+ single blocks, one K/V tensor per block):

=====================  ====================================  =============================
graph                  inputs                                outputs
=====================  ====================================  =============================
text_encoder           input_ids, attention_mask [B, L] i64  prompt_embeds [B, L, 3*hidden]
vae_encoder            image [1, 3, H, W] in [-1, 1]         ref_latents [1, h*w, 128]
transformer_prefill    ref_latents [1, N_ref, 128],          ref_kv_00 .. ref_kv_{NL-1}
                       ref_ids [N_ref, 4] i64                 [2, N_ref, heads, head_dim]
transformer_cached     latents [B, h, w, 128],               noise_pred [B, h, w, 128]
                       prompt_embeds [B, L, 3*hidden],
                       timestep [B] (sigma, i.e. t/1000),
                       img_ids [h, w, 4] i64, txt_ids [L, 4] i64,
                       ref_kv_00 .. ref_kv_{NL-1} [2, N_ref, heads, head_dim]
vae_decoder            latents [B, h, w, 128]                image [B, 3, H, W]
=====================  ====================================  =============================

Why one K/V tensor per block, without a batch axis: at 9B a reference token carries 512 KiB of
K/V (32 blocks x K,V x 32 heads x 128 x bf16), so one tensor for 4 references of 1024^2 would
hold 2^32 elements (TensorRT supports tensors over 2^31-1 elements only partly), and a batch
axis would multiply the profile maximum that Triton's TensorRT backend allocates at load by the
batch size. The images of a request share their K/V, broadcast inside the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

MODEL_DTYPE = "model"  # the export dtype (fp32, bf16 or fp16)
# Hidden states of the text encoder that the pipeline stacks into prompt_embeds (hence 3 * hidden); the
# export keeps the layers up to the last of them and drops the rest.
TEXT_LAYERS = (9, 18, 27)
BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int64": 8}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dims: tuple  # int for a static size, str for a dynamic dimension
    dtype: str = MODEL_DTYPE  # MODEL_DTYPE or "int64"


@dataclass(frozen=True)
class GraphSpec:
    name: str
    inputs: tuple
    outputs: tuple


def kv_names(num_layers: int) -> list[str]:
    """Names of the per-block K/V tensors, double blocks first: ref_kv_00, ref_kv_01, ..."""
    return [f"ref_kv_{index:02d}" for index in range(num_layers)]


def graph_specs(config: dict) -> dict[str, GraphSpec]:
    """The I/O spec of each graph for a model described by `config` (see `model_dims`)."""
    text_dim = len(TEXT_LAYERS) * config["text_hidden"]
    c = config["in_channels"]
    kv = tuple(TensorSpec(name, (2, "n_ref", config["heads"], config["head_dim"]))
               for name in kv_names(config["kv_layers"]))
    specs = [
        GraphSpec(
            "text_encoder",
            (TensorSpec("input_ids", ("batch", "text_len"), "int64"),
             TensorSpec("attention_mask", ("batch", "text_len"), "int64")),
            (TensorSpec("prompt_embeds", ("batch", "text_len", text_dim)),),
        ),
        GraphSpec(
            "vae_encoder",
            (TensorSpec("image", ("batch", 3, "height", "width")),),
            (TensorSpec("ref_latents", ("batch", "image_tokens", c)),),
        ),
        GraphSpec(
            "transformer_prefill",
            (TensorSpec("ref_latents", (1, "n_ref", c)), TensorSpec("ref_ids", ("n_ref", 4), "int64")),
            kv,
        ),
        GraphSpec(
            "transformer_cached",
            (TensorSpec("latents", ("batch", "lat_h", "lat_w", c)),
             TensorSpec("prompt_embeds", ("batch", "text_len", text_dim)),
             TensorSpec("timestep", ("batch",)),
             TensorSpec("img_ids", ("lat_h", "lat_w", 4), "int64"),
             TensorSpec("txt_ids", ("text_len", 4), "int64"),
             *kv),
            (TensorSpec("noise_pred", ("batch", "lat_h", "lat_w", c)),),
        ),
        GraphSpec(
            "vae_decoder",
            (TensorSpec("latents", ("batch", "lat_h", "lat_w", c)),),
            (TensorSpec("image", ("batch", 3, "out_height", "out_width")),),
        ),
    ]
    return {spec.name: spec for spec in specs}


def model_dims(text_encoder_config, transformer_config) -> dict:
    """The sizes the I/O spec needs, read from the component configs."""
    return {
        "text_hidden": text_encoder_config.hidden_size,
        "heads": transformer_config.num_attention_heads,
        "head_dim": transformer_config.attention_head_dim,
        "kv_layers": transformer_config.num_layers + transformer_config.num_single_layers,
        "in_channels": transformer_config.in_channels,
    }


def spec_from_manifest(name: str, entry: dict) -> GraphSpec:
    """The GraphSpec recorded for graph `name` in an export's manifest.json."""
    def tensors(items):
        return tuple(TensorSpec(t["name"], tuple(t["dims"]), t["dtype"]) for t in items)

    return GraphSpec(name, tensors(entry["inputs"]), tensors(entry["outputs"]))
