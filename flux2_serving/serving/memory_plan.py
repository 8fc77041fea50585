"""python -m flux2_serving.serving.memory_plan: does the served model fit one GPU? GPU memory, engine by engine.

Sums what one server holds on its GPU, from the model's dims and the serving envelope:

  weights       every engine's parameters in the export dtype (counted exactly: the diffusers /
                transformers modules built on the meta device, as the export truncates them)
  I/O buffers   every input and output binding at its profile maximum, per instance: Triton's
                TensorRT backend allocates them when the model loads (src/instance_state.cc)
  activations   each engine's execution-context memory at its largest profile maximum, times its
                profiles (Triton makes one context per profile, each reserving it): what the built
                engine reports (--engines-dir: build_record.json), else ESTIMATED from its widest
                live tensors (fused attention assumed)
  BLS transfers what the BLS instances hold at once (a request's K/V, prompt embeddings, ...):
                Triton's CUDA memory pool; the size printed is the --cuda-memory-pool-byte-size
  cache         the reference K/V cache's byte budget, plus one K/V set (torch's caching allocator)
  runtime       CUDA contexts of tritonserver and of every Python-backend process on the GPU

and exits 1 when the total leaves less than --headroom of the GPU free, with a next step instead of the pool
size to serve with (the tier made for the card, or the nearest tier and what it needs). Nothing here ran on a
GPU: the activation and runtime rows are estimates, the rest is arithmetic on shapes.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..contract.cli_help import command_parser
from ..contract.envelope import (
    DEFAULT_ENVELOPE,
    GPU_BLS_INSTANCES,
    VAE_ATTENTION_QUERY_CHUNKS,
    ServingEnvelope,
    binding_max_shapes,
)
from ..contract.graphs import COMPONENTS, GRAPHS
from ..contract.manifest import BUILD_RECORD as RECORD
from ..contract.names import CACHE_MODEL
from ..contract.specs import BYTES_PER_ELEMENT, TEXT_LAYERS, graph_specs, model_dims
from ..contract.tiers import BY_NAME, TIERS, MemoryTier, tier_for
from ..modeling.checkpoint import KLEIN_9B_TEXT_ENCODER, KLEIN_9B_TRANSFORMER

GIB = 2**30
CUDA_CONTEXT_GIB = 0.5  # per process that initialises CUDA (estimate for an H100 with CUDA 12)

EXAMPLES = """\
examples:
  python -m flux2_serving.serving.memory_plan                           # klein 9B, bf16, 80 GiB, the shipped envelope
  python -m flux2_serving.serving.memory_plan --gpu-gib 48              # the tier made for a 48 GB card, and its plan
  python -m flux2_serving.serving.memory_plan --tier 80gb-bf16 --gpu-gib 48  # today's engines on 48 GB (exit 1)
  python -m flux2_serving.serving.memory_plan --gpu-gib 24              # under 32 GB: no tier; the next step says why
  python -m flux2_serving.serving.memory_plan --reference-tokens 16384  # 4 references of 1024x1024: what it costs
  python -m flux2_serving.serving.memory_plan --model checkpoints/tiny --dtype fp32
"""


@dataclass
class ModelSize:
    """What the plan needs to know about a model: the I/O spec's dims and each engine's parameters."""
    dims: dict
    params: dict  # component -> parameter count (buffers included)
    mlp_hidden: int
    text_intermediate: int
    vae_channels: int  # widest channel count at full resolution
    # component -> weights of the linear layers in its blocks: what an FP8 (E4M3) recipe quantizes;
    # embedders, norms, modulation and the output projection stay bf16 (tiers.MemoryTier.weights)
    fp8_params: dict = field(default_factory=dict)


def _count(module) -> int:
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers())


def _linear_weights(blocks, linear: type) -> int:
    """Weights of the `linear` (torch.nn.Linear) layers inside `blocks`, counted once each."""
    linears = {id(m): m for block in blocks for m in block.modules() if isinstance(m, linear)}
    return sum(m.weight.numel() for m in linears.values())


def model_size(model: str | None) -> ModelSize:
    """Dims and parameter counts of `model` (a diffusers checkpoint folder or hub id), or of klein 9B.

    The modules are built on the meta device: no weight is read or allocated.
    """
    # torch, diffusers, transformers and the wrappers: heavy, and only this function needs them
    # (serving.repository imports this module for bls_transfer_bytes alone).
    import torch
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import AutoConfig, Qwen3Config, Qwen3ForCausalLM

    from ..modeling.components import reference_stream_only

    if model is None:
        text_config, transformer_config, vae_config = Qwen3Config(**KLEIN_9B_TEXT_ENCODER), KLEIN_9B_TRANSFORMER, {}
    else:
        text_config = AutoConfig.from_pretrained(model, subfolder="text_encoder")
        transformer_config = Flux2Transformer2DModel.load_config(model, subfolder="transformer")
        vae_config = AutoencoderKLFlux2.load_config(model, subfolder="vae")
    with torch.device("meta"):
        transformer = Flux2Transformer2DModel.from_config(transformer_config)
        vae = AutoencoderKLFlux2.from_config(vae_config)
        text_config.num_hidden_layers = min(text_config.num_hidden_layers, max(TEXT_LAYERS))
        if getattr(text_config, "layer_types", None):
            text_config.layer_types = text_config.layer_types[:text_config.num_hidden_layers]
        text = Qwen3ForCausalLM(text_config).model  # no LM head; the final norm is replaced by identity
    cfg = transformer.config
    dims = model_dims(text_config, cfg)
    transformer_params = _count(transformer)
    prefill_params = _count(reference_stream_only(transformer))  # without the text stream and output layers
    encoder = _count(vae.encoder) + _count(vae.bn) + (_count(vae.quant_conv) if vae.quant_conv is not None else 0)
    decoder = _count(vae.decoder) + _count(vae.bn) + (
        _count(vae.post_quant_conv) if vae.post_quant_conv is not None else 0)
    params = {"text_encoder": _count(text) - _count(text.norm), "vae_encoder": encoder,
              "transformer_prefill": prefill_params, "transformer_cached": transformer_params,
              "vae_decoder": decoder}
    prefill = reference_stream_only(transformer)
    blocks = {"text_encoder": text.layers,
              "transformer_prefill": [*prefill.transformer_blocks, *prefill.single_transformer_blocks],
              "transformer_cached": [*transformer.transformer_blocks, *transformer.single_transformer_blocks]}
    fp8 = {name: _linear_weights(modules, torch.nn.Linear) for name, modules in blocks.items()}
    return ModelSize(dims, params, int(cfg.num_attention_heads * cfg.attention_head_dim * cfg.mlp_ratio),
                     text_config.intermediate_size, vae.config.block_out_channels[0], fp8)


def _bytes(shape, dtype: str) -> int:
    return math.prod(shape) * BYTES_PER_ELEMENT[dtype]


def io_bytes(spec, dtype: str, envelope: ServingEnvelope) -> int:
    """Input and output bindings of one engine instance at the largest profile maximum."""
    shapes = binding_max_shapes(spec, envelope)
    return sum(_bytes(shapes[t.name], "int64" if t.dtype == "int64" else dtype) for t in spec.inputs + spec.outputs)


def max_tensor_elements(spec, envelope: ServingEnvelope) -> tuple[str, int]:
    """The largest input or output of a graph at its largest profile maximum: (name, elements)."""
    shapes = binding_max_shapes(spec, envelope)
    name = max(shapes, key=lambda n: math.prod(shapes[n]))
    return name, math.prod(shapes[name])


def activation_bytes(name: str, size: ModelSize, dtype: str, envelope: ServingEnvelope) -> int:
    """ESTIMATED memory of one execution context at the largest profile maximum: the widest set of
    intermediate tensors alive at once (TensorRT reuses memory between layers), attention fused (no
    score matrix)."""
    d, b = size.dims, BYTES_PER_ELEMENT[dtype]
    ranges = envelope.dim_ranges(name)
    hidden = d["heads"] * d["head_dim"]
    module = GRAPHS[name].module
    if module == "transformer":
        if name == "transformer_cached":
            tokens = ranges["batch"][2] * (ranges["lat_h"][2] * ranges["lat_w"][2] + ranges["text_len"][2])
        else:
            tokens = ranges["n_ref"][2] + 2  # references + the one-token dummy text and image
        # A single-stream block: fused QKV+MLP projection (3h + 2m), RoPE'd q and k (2h), attention
        # output (h), MLP activation (m), residual in and out (2h).
        return tokens * (8 * hidden + 3 * size.mlp_hidden) * b
    if module == "text_encoder":
        tokens = ranges["batch"][2] * ranges["text_len"][2]
        text = d["text_hidden"]
        # Residual, normed input, q/k/v, attention output, gate/up, activation; plus the three kept hidden states.
        return tokens * (8 * text + 3 * size.text_intermediate) * b
    largest_box = max(r["height"][2] * r["width"][2] for r in envelope.profile_ranges(name))
    pixels = {"vae_encoder": largest_box,
              "vae_decoder": ranges["batch"][2] * ranges["out_height"][2] * ranges["out_width"][2]}[name]
    # A full-resolution ResNet block: input, normalised/activated input and conv output; or, at 1/8 of
    # the resolution, the mid-block attention, not fused: one slice of queries' scores against every
    # key, in and out of its fp32 softmax (components.query_chunked_attention); whichever is larger.
    tokens = pixels // 64
    scores = 2 * math.ceil(tokens / VAE_ATTENTION_QUERY_CHUNKS) * tokens * BYTES_PER_ELEMENT["fp32"]
    return max(pixels * size.vae_channels * 3 * b, scores)


def kv_set_bytes(dims: dict, dtype: str, envelope: ServingEnvelope) -> int:
    """One reference set's K/V at the envelope's most reference tokens (2 GiB at 9B in bf16, 4096 tokens)."""
    return (dims["kv_layers"] * 2 * envelope.reference_tokens[2] * dims["heads"] * dims["head_dim"]
            * BYTES_PER_ELEMENT[dtype])


def cache_peak_bytes(dims: dict, dtype: str, envelope: ServingEnvelope) -> int:
    """The reference cache's device memory at its peak: the budget's entries plus one more set. The cache
    evicts before it copies a new set in (flux2_serving/models/lru.py make_room), but the blocks an eviction
    frees stay with torch's caching allocator, which reuses them only for tensors that fit: a set of another
    size (another number of references) is allocated beside them, up to one more set (issue 29)."""
    return envelope.reference_cache_bytes + min(kv_set_bytes(dims, dtype, envelope), envelope.reference_cache_bytes)


def bls_transfer_bytes(dims: dict, dtype: str, envelope: ServingEnvelope) -> int:
    """What one BLS instance holds in the pool at once for the largest request: the reference set's
    K/V (received from the prefill or the cache), the prompt embeddings, one cached-step call's noise
    prediction and one decoded image; and, while a cached-step call runs, a copy of its inputs: the
    Python backend copies every GPU input of a BLS request into a fresh pool buffer on each exec()
    (python_backend src/python_be.cc ExecuteBLSRequest), so the K/V is there twice, every step."""
    d, b = dims, BYTES_PER_ELEMENT[dtype]
    kv = kv_set_bytes(dims, dtype, envelope)
    side = envelope.output_side[2]
    embeds = envelope.max_num_images_per_prompt * envelope.text_len * 3 * d["text_hidden"] * b
    noise = envelope.engine_batch["transformer_cached"] * (side // 16) ** 2 * d["in_channels"] * b
    image = envelope.engine_batch["vae_decoder"] * 3 * side * side * b
    call_embeds = envelope.engine_batch["transformer_cached"] * envelope.text_len * 3 * d["text_hidden"] * b
    call_inputs = kv + call_embeds + noise  # K/V, prompt embeddings and latents of the call in flight
    return kv + embeds + noise + image + call_inputs


def built_records(engines_dir) -> dict:
    """flux2_serving.export.build_engines' OUT/build_record.json ({component: record}), or {} if there is none."""
    path = Path(engines_dir) / RECORD if engines_dir else None
    return json.loads(path.read_text()) if path and path.exists() else {}


def weight_bytes(size: ModelSize, name: str, precision: str) -> int:
    """One engine's weights: all in `precision`, or for "fp8" its blocks' linear weights in FP8 and the
    rest in bf16."""
    if precision != "fp8":
        return size.params[name] * BYTES_PER_ELEMENT[precision]
    quantized = size.fp8_params[name]
    return quantized * BYTES_PER_ELEMENT["fp8"] + (size.params[name] - quantized) * BYTES_PER_ELEMENT["bf16"]


def plan(size: ModelSize, dtype: str, envelope: ServingEnvelope, bls_instances: int,
         instances: int = 1, built: dict | None = None, tier: MemoryTier | None = None) -> list[tuple[str, str, int]]:
    """Rows (what, component or '-', bytes). `instances` per engine multiplies weights too: Triton's
    tensorrt_backend shares one deserialized engine between the instances on a device only when no
    input or output has a dynamic dimension (model_state.cc), and every engine here has some.
    `built`: build records (built_records); an engine's recorded context memory replaces its estimate.
    `tier` (tiers.MemoryTier): each engine's weight precision, streamed engines (their budget on the GPU,
    the rest in host memory) and the cache in host memory; without one every weight is in `dtype`."""
    built = built or {}
    specs = graph_specs(size.dims)
    rows = []
    for name in COMPONENTS:  # every instance of a dynamic-shape engine holds its own copy (see plan's docstring)
        precision = tier.weights[name] if tier else dtype
        if tier and name in tier.streamed:
            rows.append((f"weights ({precision}, streamed: budget on the GPU)", name,
                         instances * int(tier.stream_budget_gib * GIB)))
        else:
            rows.append((f"weights ({precision})" if tier else "weights", name,
                         instances * weight_bytes(size, name, precision)))
    for name in COMPONENTS:
        rows.append(("I/O buffers at profile max", name, instances * io_bytes(specs[name], dtype, envelope)))
    for name in COMPONENTS:  # Triton makes one context per profile (tensorrt_backend instance_state.cc)
        contexts = instances * len(envelope.profile_ranges(name))
        if name in built:
            rows.append(("activations (built engine)", name, contexts * built[name]["device_memory_bytes"]))
        else:
            rows.append(("activations (estimate)", name, contexts * activation_bytes(name, size, dtype, envelope)))
    rows.append(("BLS transfers (CUDA memory pool)", f"{bls_instances} BLS",
                 bls_instances * bls_transfer_bytes(size.dims, dtype, envelope)))
    if tier and tier.cache_on_host:
        rows.append(("reference K/V cache (in host memory)", CACHE_MODEL, 0))
    else:
        peak = cache_peak_bytes(size.dims, dtype, envelope)
        rows.append(("reference K/V cache: budget + one set", CACHE_MODEL, peak))
    processes = 1 + bls_instances + 1  # tritonserver, the BLS instances, the cache
    rows.append(("CUDA contexts (estimate)", f"{processes} processes", int(processes * CUDA_CONTEXT_GIB * GIB)))
    return rows


def render(rows, gpu_gib: float, headroom: float, size: ModelSize, dtype: str, envelope: ServingEnvelope,
           label: str = "", next_step: str = "") -> str:
    """The table and its verdict; then the pool size to serve with when it fits, else `next_step`."""
    total = total_bytes(rows)
    budget = gpu_gib * GIB
    lines = ["| what | component | GiB |", "|---|---|---:|"]
    lines += [f"| {what} | {who} | {value / GIB:.2f} |" for what, who, value in rows]
    lines.append(f"| **total** | | **{total / GIB:.2f}** |")
    free = 1 - total / budget
    verdict = "fits" if free >= headroom else "DOES NOT FIT"
    lines.append("")
    lines.append(f"GPU {gpu_gib:g} GiB, {label or dtype}: total {total / GIB:.2f} GiB, headroom {free:.1%} "
                 f"(required {headroom:.0%}): {verdict}")
    if free < headroom:
        usable = budget * (1 - headroom)
        lines.append(f"shortfall: {(total - usable) / GIB:.2f} GiB: the plan needs {total / GIB:.2f} GiB and "
                     f"{gpu_gib:g} GiB less {headroom:.0%} leaves {usable / GIB:.2f}; largest rows: "
                     + ", ".join(f"{what} {who} {value / GIB:.2f}" for what, who, value
                                 in sorted(rows, key=lambda row: -row[2])[:3]))
    graph, tensor, elements = largest_tensor(size, envelope)
    lines.append(f"largest tensor in any profile: {graph}.{tensor}, {elements:,} elements "
                 f"(TensorRT fully supports up to 2^31-1 = {2**31 - 1:,})")
    graph, shape, elements = unfused_attention_scores(size, envelope)
    lines.append(f"assumed: TensorRT fuses the transformers' attention; unfused, {graph} would hold scores of "
                 f"{list(shape)} = {elements:,} elements ({elements * BYTES_PER_ELEMENT[dtype] / GIB:.1f} GiB): "
                 "make engine-check reports fused attention per engine")
    if free >= headroom:
        pool = next(b for what, _, b in rows if what.startswith("BLS transfers"))
        lines.append(f"serve with: tritonserver --cuda-memory-pool-byte-size=<gpu>:{pool}")
    elif next_step:
        lines.append(f"next step: {next_step}")
    return "\n".join(lines)


def card_needed(rows, headroom: float) -> float:
    """GiB of GPU memory on which the plan leaves `headroom` free."""
    return total_bytes(rows) / (1 - headroom) / GIB


def next_step(gpu_gib: float, headroom: float, tier: MemoryTier | None, rows, plan_for, options: list[str]) -> str:
    """What to do when the plan does not fit (one paragraph): the tier made for the card, the nearest tier and
    what it needs, or which options cost the shortfall. `plan_for(tier, with_options)`: rows of a tier's plan,
    with or without the `options` asked for (their command-line spelling)."""
    need = card_needed(rows, headroom)
    if tier is None:
        return (f"a card of at least {need:.1f} GiB, or bf16 engines (--dtype bf16, what make memory-plan plans): "
                "the memory tiers (contract/tiers.py) and their FP8 engines apply to bf16 exports only")
    smallest = min(TIERS, key=lambda candidate: candidate.gpu_gib)
    if gpu_gib < smallest.gpu_gib:
        nearest = plan_for(smallest, True)
        what, who, largest = max(nearest, key=lambda row: row[2])
        every_step = (" runs at every denoising step: streamed, it would cross PCIe at every step"
                      if who == "transformer_cached" else "")
        return (f"a card of {smallest.gpu_gib:g} GB or more. No tier is made for a {gpu_gib:g} GiB card: the nearest, "
                f"{smallest.name} ({smallest.cards}), needs {total_bytes(nearest) / GIB:.2f} GiB, a card of at least "
                f"{card_needed(nearest, headroom):.1f} GiB with {headroom:.0%} free. Cards under {smallest.gpu_gib:g} "
                f"GB are not a target: {smallest.name} already has FP8 engines, streams the weights of the engines "
                f"that run once per request and makes one image at a time; its largest row, {what} {who} "
                f"{largest / GIB:.2f} GiB,{every_step or ' is what is left'}")
    made = tier_for(gpu_gib)
    if made is not tier:
        rows_made = plan_for(made, True)
        if card_needed(rows_made, headroom) <= gpu_gib:
            return (f"the tier made for a {gpu_gib:g} GiB card is {made.name} ({made.cards}): "
                    f"{total_bytes(rows_made) / GIB:.2f} GiB; make memory-plan GPU_GIB={gpu_gib:g} without TIER= "
                    f"plans it, and TIER={made.name} builds it (make engines, make repository"
                    + (", after make export DTYPE=bf16 QUANTIZE=fp8)" if "fp8" in made.weights.values() else ")"))
    if options:
        defaults = plan_for(tier, False)
        if card_needed(defaults, headroom) <= gpu_gib:
            return (f"{tier.name}'s own settings fit ({total_bytes(defaults) / GIB:.2f} GiB); with "
                    f"{' '.join(options)} the plan needs a card of at least {need:.1f} GiB")
    return f"a card of at least {need:.1f} GiB"


def unfused_attention_scores(size: ModelSize, envelope: ServingEnvelope) -> tuple[str, tuple, int]:
    """(graph, shape, elements) of the largest attention-score tensor the transformer graphs would
    materialise if TensorRT did not fuse their attention: the cached step's [batch, heads, txt + img,
    ref + txt + img] at the profile maximum. The plan assumes fusion (no such tensor)."""
    ranges = envelope.dim_ranges("transformer_cached")
    queries = ranges["text_len"][2] + ranges["lat_h"][2] * ranges["lat_w"][2]
    shape = (ranges["batch"][2], size.dims["heads"], queries, ranges["n_ref"][2] + queries)
    return "transformer_cached", shape, math.prod(shape)


def largest_tensor(size: ModelSize, envelope: ServingEnvelope) -> tuple[str, str, int]:
    """(graph, tensor, elements) of the largest tensor in any engine's profile."""
    return max(((spec.name, *max_tensor_elements(spec, envelope)) for spec in graph_specs(size.dims).values()),
               key=lambda item: item[2])


def total_bytes(rows) -> int:
    return sum(b for _, _, b in rows)


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.serving.memory_plan", __doc__, EXAMPLES)
    parser.add_argument("--model", default=None, help="diffusers checkpoint folder or hub id (default: klein 9B dims)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                        help="engine dtype (default %(default)s)")
    parser.add_argument("--gpu-gib", type=float, default=80.0,
                        help="GPU memory in GiB (default %(default)s; an H100 80GB reports ~79.2 to CUDA)")
    parser.add_argument("--headroom", type=float, default=0.15,
                        help="share of the GPU to keep free (default %(default)s)")
    parser.add_argument("--tier", choices=tuple(BY_NAME),
                        help="memory tier (contract/tiers.py; default: the one made for --gpu-gib; bf16/fp8 "
                             "engines only, so none with --dtype fp32/fp16)")
    parser.add_argument("--reference-tokens", type=int, default=None,
                        help="max tokens of a request's reference set (default: the tier's; 4096 = one reference "
                             "of 1024^2)")
    parser.add_argument("--reference-cache-bytes", type=int, default=None,
                        help="reference K/V cache budget (default: the tier's, the repository's)")
    parser.add_argument("--engines-dir", default=None,
                        help="built engines (their build_record.json): measured context memory replaces estimates")
    parser.add_argument("--instances", type=int, default=1,
                        help="instances per engine (each holds its own weights: dynamic shapes; default %(default)s)")
    parser.add_argument("--bls-instances", type=int, default=GPU_BLS_INSTANCES,
                        help="BLS instances on the GPU (default %(default)s, the repository's default on a GPU)")
    args = parser.parse_args(argv)
    tier = (BY_NAME[args.tier] if args.tier else tier_for(args.gpu_gib)) if args.dtype == "bf16" else None
    size = model_size(args.model)
    built = built_records(args.engines_dir)
    defaults = {"reference_tokens": None, "reference_cache_bytes": None, "instances": 1,
                "bls_instances": GPU_BLS_INSTANCES}
    options = [f"--{name.replace('_', '-')} {getattr(args, name)}" for name, value in defaults.items()
               if getattr(args, name) != value]

    def with_options(envelope: ServingEnvelope, on: bool = True) -> ServingEnvelope:
        if on and args.reference_cache_bytes is not None:
            envelope = replace(envelope, reference_cache_bytes=args.reference_cache_bytes)
        if on and args.reference_tokens is not None:
            tokens = envelope.reference_tokens
            envelope = replace(envelope, reference_tokens=(tokens[0], min(tokens[1], args.reference_tokens),
                                                           args.reference_tokens))
        return envelope

    def plan_for(candidate: MemoryTier, on: bool):
        return plan(size, "bf16", with_options(candidate.envelope, on), args.bls_instances if on else GPU_BLS_INSTANCES,
                    args.instances if on else 1, built, candidate)

    envelope = with_options(tier.envelope if tier else DEFAULT_ENVELOPE)
    rows = plan(size, args.dtype, envelope, args.bls_instances, args.instances, built, tier)
    if tier:
        print(f"tier: {tier.name}, made for {tier.gpu_gib:g} GB cards ({tier.cards}): {tier.tradeoffs}"
              + ("; NOT RUN: no FP8 engine has been built (the FP8 graphs are checked on the CPU only)"
                 if "fp8" in tier.weights.values() else "")
              + ("; NOT RUN: weight streaming is written to TensorRT's API, not run" if tier.streamed else ""))
    print(f"model: {args.model or 'klein 9B (dims of black-forest-labs/FLUX.2-klein-9b-kv)'}; envelope: output "
          f"{envelope.output_side[0]}-{envelope.output_side[2]} px, up to {envelope.reference_tokens[2]} reference "
          f"tokens, {envelope.max_num_images_per_prompt} images per request, engine batches {envelope.engine_batch}")
    fits = 1 - total_bytes(rows) / (args.gpu_gib * GIB) >= args.headroom
    step = "" if fits else next_step(args.gpu_gib, args.headroom, tier, rows, plan_for, options)
    print(render(rows, args.gpu_gib, args.headroom, size, args.dtype, envelope, f"tier {tier.name}" if tier else "",
                 step))
    return 0 if fits else 1


if __name__ == "__main__":
    sys.exit(main())
