"""Memory tiers: which card class takes which engines, envelope and levers (issue 21). Each tier is a
named serving envelope plus the weight precision of each engine and where the reference K/V cache and
the rarely-run engines' weights live. `python -m flux2_serving.serving.memory_plan --gpu-gib N` picks
the largest tier made for a card of at most N GiB and prints its plan.

NOT RUN ON A CARD: the FP8 graphs (export --quantize fp8, NVIDIA Model Optimizer) are checked on the
CPU only (onnxruntime, trt_compat), no FP8 engine has been built, and the TensorRT weight-streaming
runtime of the component runner (models/trt_runtime.py) is written to TensorRT's documented API but
has not run; the FP8 tiers' plans count FP8 weight bytes from the quantizable layers
(memory_plan.ModelSize.fp8_params). Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from .envelope import DEFAULT_ENVELOPE, ServingEnvelope
from .graphs import COMPONENTS

FP8_ENGINES = ("text_encoder", "transformer_prefill", "transformer_cached")  # the VAE stays bf16


@dataclass(frozen=True)
class MemoryTier:
    name: str
    gpu_gib: float  # the card it is made for (what CUDA reports is a little less; the plan keeps 15% free)
    cards: str
    envelope: ServingEnvelope = DEFAULT_ENVELOPE
    # Weight precision per engine: "bf16", or "fp8" (E4M3 Q/DQ on the linear layers of the blocks; the
    # rest stays bf16). Activations, I/O and the K/V stay bf16 in every tier.
    weights: dict = field(default_factory=lambda: dict.fromkeys(COMPONENTS, "bf16"))
    # The reference K/V cache in host memory (reference_kv_cache on the CPU): a hit then costs one
    # host-to-device copy of the set's K/V instead of GPU memory held for it.
    cache_on_host: bool = False
    # Engines whose weights TensorRT streams from host memory, keeping `stream_budget_gib` of each on the
    # GPU: the prefill and the text encoder run once per request, the cached step every step.
    streamed: tuple = ()
    stream_budget_gib: float = 0.0
    tradeoffs: str = ""


_FP8 = {**dict.fromkeys(COMPONENTS, "bf16"), **dict.fromkeys(FP8_ENGINES, "fp8")}

TIERS = (
    MemoryTier("80gb-bf16", 80, "H100 / H200 / A100 80GB", tradeoffs="the reference: bf16 engines, as served today"),
    MemoryTier("48gb-fp8", 48, "L40S, RTX 6000 Ada (FP8 tensor cores: Ada, Hopper, Blackwell)", weights=_FP8,
               cache_on_host=True,
               tradeoffs="FP8 transformer and text encoder (quality: to measure against bf16); a reference "
                         "cache hit copies the set's K/V from host memory (2 GiB at 4096 tokens)"),
    MemoryTier("32gb-fp8", 32, "RTX 5090 (Blackwell)", weights=_FP8, cache_on_host=True,
               envelope=replace(DEFAULT_ENVELOPE, reference_tokens=(0, 2048, 2048),
                                engine_batch={**DEFAULT_ENVELOPE.engine_batch, "transformer_cached": 1}),
               streamed=("text_encoder", "transformer_prefill"), stream_budget_gib=1.0,
               tradeoffs="as 48gb-fp8, plus: references up to 2048 tokens (one of ~724^2), images of a "
                         "request one at a time, the text encoder and the prefill streamed from host memory "
                         "once per request (PCIe-bound)"),
)
BY_NAME = {tier.name: tier for tier in TIERS}


def tier_for(gpu_gib: float) -> MemoryTier:
    """The tier made for the largest card class not above `gpu_gib` (the smallest tier below that)."""
    fitting = [tier for tier in TIERS if tier.gpu_gib <= gpu_gib]
    return max(fitting, key=lambda tier: tier.gpu_gib) if fitting else min(TIERS, key=lambda tier: tier.gpu_gib)
