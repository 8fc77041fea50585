"""The serving envelope: the one declaration that TensorRT profiles, Triton's batch sizes, the
BLS's request limits and the memory plan derive from.

Pixels map to tokens as the pipeline does: 8x VAE downsampling, then 2x2 patchify, so one
token per 16x16 pixels; a 1024x1024 image is 64x64 = 4096 tokens. Text is always padded
to 512 tokens. Standard library only (the engine builder runs without torch).

The defaults fit an 80 GB GPU at 9B in bf16 with >= 15% headroom (`python -m flux2_serving.serving.memory_plan`).
What sizes them: Triton's TensorRT backend allocates every input and output binding at its
profile maximum when a model loads, and at 9B every reference token carries 512 KiB of K/V
(prefill output, cached-step input, the cache each hold one; the BLS two while a step runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .graphs import GRAPHS

PIXELS_PER_TOKEN_SIDE = 16
# Dynamic dims that must be a multiple of more than 1: the VAE encoder's pixel sizes (the graph
# patchifies 16x16 pixels into a token; onnx_export traces them as 16 * Dim).
DIM_MULTIPLE = {"height": PIXELS_PER_TOKEN_SIDE, "width": PIXELS_PER_TOKEN_SIDE}
# The VAE graphs run their (unfused, 512-wide single-head) attention in this many query slices, so one
# slice's scores are alive at a time (components.query_chunked_attention; the memory plan counts them).
VAE_ATTENTION_QUERY_CHUNKS = 16
# BLS instances on a GPU (flux2_serving.serving.repository's default there): the Python backend copies a BLS
# request's GPU inputs into a fresh pool buffer per call, so each instance holds a request's K/V
# twice while a step runs (memory_plan.bls_transfer_bytes). With the slim prefill two fit 80 GB
# with 16% headroom, just above the 15% line, while the activation rows are still estimates: one
# until the built engines' figures (build_record.json) say there is room.
GPU_BLS_INSTANCES = 1


def _engine_batch() -> dict[str, int]:
    """Largest batch each engine runs (graphs.Graph.engine_batch says why)."""
    return {name: graph.engine_batch for name, graph in GRAPHS.items()}


@dataclass(frozen=True)
class ServingEnvelope:
    output_side: tuple[int, int, int] = (256, 1024, 1440)  # min, opt, max pixels per side, multiples of 16
    max_references: int = 4
    # Per side of a preprocessed reference. diffusers rejects < 64 px; the maximum with
    # reference_max_area bounds the aspect ratio: 2048^2 / 1024^2 = 4:1. The vae_encoder's profiles
    # are bounded by that area, not by the square of the longest side (profile_ranges).
    reference_side: tuple[int, int, int] = (64, 1024, 2048)
    reference_max_area: int = 1024 * 1024  # pixels; larger references are resized down to it (as diffusers)
    # Tokens of the whole ordered reference set after preprocessing: one reference of 1024^2, or two
    # of ~724^2, or four of 512^2. At 9B in bf16 the K/V of 4096 tokens is 2 GiB, held by the prefill's
    # outputs, the cached step's inputs, each BLS instance and the cache; twice as many tokens (two
    # references of 1024^2) did not fit 80 GB with 15% headroom (python -m flux2_serving.serving.memory_plan).
    reference_tokens: tuple[int, int, int] = (0, 4096, 4096)
    max_num_images_per_prompt: int = 4
    engine_batch: dict = field(default_factory=_engine_batch)
    text_len: int = 512
    max_num_inference_steps: int = 50
    max_input_pixels: int = 4096 * 4096  # declared size of an encoded reference, checked before decoding
    # Bytes of one encoded reference: its raw RGBA pixels at max_input_pixels (no sane encoding is larger).
    max_reference_bytes: int = 4 * 4096 * 4096
    # Bytes of the UTF-8 prompt. The tokenizer keeps text_len tokens (diffusers truncates the rest, and so
    # do we); 16 KiB is several times what 512 tokens hold, and bounds the tokenizer's work and memory.
    max_prompt_bytes: int = 16 * 1024
    # Bytes of one whole request (HTTP body, gRPC message), checked by the embedded server's gate
    # (flux2_serving/server/gate.py) before tritonserver reads it: one reference at max_reference_bytes, or
    # several adding up to it: the 64 MiB default of --http-max-input-size in Triton 25.06 and later.
    max_request_bytes: int = 4 * 4096 * 4096 + 2**20
    # Byte budget of the shared reference K/V cache: 4 GiB holds two single-reference entries of the
    # largest set (2 GiB each at 9B in bf16); the memory plan counts it next to the engines.
    reference_cache_bytes: int = 4 * 2**30
    # The BLS's queue (Triton's dynamic batcher, which for max_batch_size 0 queues without batching):
    # beyond bls_max_queue waiting requests Triton refuses at once with UNAVAILABLE "Exceeds maximum
    # queue size", and a request waits at most bls_queue_timeout_s (UNAVAILABLE "Request timeout
    # expired"); a caller may ask for less with Triton's `timeout` request parameter, never for more.
    # At 1024^2 one request takes about a second on an H100 (estimate), so 8 waiting is ~10 s of work.
    bls_max_queue: int = 8
    bls_queue_timeout_s: float = 60

    def tokens(self, side_px: int) -> int:
        return side_px // PIXELS_PER_TOKEN_SIDE

    @property
    def max_reference_aspect(self) -> int:
        """Largest aspect ratio a reference may have: beyond it a side exceeds the vae_encoder profile."""
        return self.reference_side[2] ** 2 // self.reference_max_area

    @property
    def reference_short_side(self) -> int:
        """Longest shorter side a reference within reference_max_area can have (a multiple of 16)."""
        side = math.isqrt(self.reference_max_area)
        return min(side - side % PIXELS_PER_TOKEN_SIDE, self.reference_side[2])

    def area_limits(self, graph: str) -> list[tuple[str, str, int]]:
        """(dimension, dimension, most pixels) products of dims that `graph` bounds beyond their ranges."""
        return [("height", "width", self.reference_max_area)] if GRAPHS[graph].area_bounded else []

    def dim_ranges(self, graph: str) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every dynamic dimension name used in specs.graph_specs, for `graph`:
        the union of its TensorRT profiles' ranges (profile_ranges)."""
        out_lo, out_opt, out_hi = (self.tokens(s) for s in self.output_side)
        ref_lo, ref_opt, ref_hi = self.reference_side
        ref_short = self.reference_short_side
        n_ref = self.reference_tokens
        if GRAPHS[graph].min_references:  # at least that many references, each at least 4x4 tokens
            n_ref = (GRAPHS[graph].min_references * self.tokens(ref_lo) ** 2, *n_ref[1:])
        batch_hi = self.engine_batch[graph]
        return {
            "batch": (1, 1, batch_hi),
            "text_len": (self.text_len,) * 3,
            "height": (ref_lo, ref_opt, ref_hi),  # vae_encoder input (reference pixels)
            "width": (ref_lo, ref_opt, ref_hi),
            # vae_encoder output: at most a short side's tokens times a long side's (the profiles' maxima)
            "image_tokens": (self.tokens(ref_lo) ** 2, self.tokens(ref_opt) ** 2,
                             self.tokens(ref_short) * self.tokens(ref_hi)),
            "lat_h": (out_lo, out_opt, out_hi),  # output latent grid (cached step, vae_decoder)
            "lat_w": (out_lo, out_opt, out_hi),
            "out_height": tuple(PIXELS_PER_TOKEN_SIDE * t for t in (out_lo, out_opt, out_hi)),
            "out_width": tuple(PIXELS_PER_TOKEN_SIDE * t for t in (out_lo, out_opt, out_hi)),
            "n_ref": n_ref,
        }

    def profile_ranges(self, graph: str) -> list[dict[str, tuple[int, int, int]]]:
        """dim_ranges of each TensorRT optimization profile of `graph`, in profile order. One profile,
        except the vae_encoder's when its references are bounded by area rather than by the square of
        the longest side: a landscape box (height up to the short side) and a portrait box. Every
        reference within the side and area limits lies in one of them (its shorter side is at most
        reference_short_side), and neither box exceeds twice the area, where the square would hold
        four times it: the largest tensor TensorRT plans for is half the square's. Triton's
        tensorrt_backend runs only profile 0 unless the instance group lists the profiles
        (flux2_serving.serving.triton_config does), and the component checks the area itself (area_limits)."""
        ranges = self.dim_ranges(graph)
        lo, opt, hi = self.reference_side
        short = self.reference_short_side
        if not GRAPHS[graph].area_bounded or short >= hi:
            return [ranges]
        boxes = []
        for h_hi, w_hi in ((short, hi), (hi, short)):
            boxes.append({**ranges, "height": (lo, min(opt, h_hi), h_hi), "width": (lo, min(opt, w_hi), w_hi),
                          "image_tokens": (ranges["image_tokens"][0], self.tokens(min(opt, h_hi)) * self.tokens(
                              min(opt, w_hi)), self.tokens(h_hi) * self.tokens(w_hi))})
        return boxes

    def request_limits(self) -> dict[str, int]:
        """The BLS's request limits (config.pbtxt parameters), all derived from the envelope."""
        return {
            "max_references": self.max_references,
            "max_reference_tokens": self.reference_tokens[2],
            "min_reference_side": self.reference_side[0],
            "max_reference_side": self.reference_side[2],
            "max_reference_aspect": self.max_reference_aspect,
            "reference_max_area": self.reference_max_area,
            "max_input_pixels": self.max_input_pixels,
            "max_reference_bytes": self.max_reference_bytes,
            "max_prompt_bytes": self.max_prompt_bytes,
            "min_side": self.output_side[0],
            "max_side": self.output_side[2],
            "default_side": self.output_side[1],
            "multiple_of": PIXELS_PER_TOKEN_SIDE,
            "max_num_images_per_prompt": self.max_num_images_per_prompt,
            "max_num_inference_steps": self.max_num_inference_steps,
            "max_batch_transformer_cached": self.engine_batch["transformer_cached"],
            "max_batch_vae_decoder": self.engine_batch["vae_decoder"],
        }


DEFAULT_ENVELOPE = ServingEnvelope()


def shape_range(dims, ranges: dict) -> tuple[tuple, tuple, tuple]:
    """(min shape, opt shape, max shape) of a tensor whose dims are ints or names in `ranges`."""
    lo, opt, hi = [], [], []
    for dim in dims:
        triple = ranges[dim] if isinstance(dim, str) else (dim, dim, dim)
        for acc, value in zip((lo, opt, hi), triple, strict=True):
            acc.append(value)
    return tuple(lo), tuple(opt), tuple(hi)


def engine_profiles(spec, envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> list[dict[str, tuple[tuple, tuple, tuple]]]:
    """One {input name: (min shape, opt shape, max shape)} per TensorRT profile of a GraphSpec."""
    return [{tensor.name: shape_range(tensor.dims, ranges) for tensor in spec.inputs}
            for ranges in envelope.profile_ranges(spec.name)]


def max_shapes(spec, envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> list[dict[str, tuple]]:
    """One {input and output name: shape} per profile, at the profile's maximum."""
    return [{tensor.name: shape_range(tensor.dims, ranges)[2] for tensor in spec.inputs + spec.outputs}
            for ranges in envelope.profile_ranges(spec.name)]


def binding_max_shapes(spec, envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> dict[str, tuple]:
    """{input and output name: shape} that Triton allocates for each binding at load: the largest over
    the profiles (tensorrt_backend sizes one buffer per tensor for all of an instance's contexts)."""
    profiles = max_shapes(spec, envelope)
    return {name: max((shapes[name] for shapes in profiles), key=math.prod) for name in profiles[0]}
