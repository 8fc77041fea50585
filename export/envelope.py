"""The serving envelope: the one declaration TensorRT profiles (and request limits) derive from.

Pixels map to tokens as the pipeline does: 8x VAE downsampling, then 2x2 patchify, so one
token per 16x16 pixels; a 1024x1024 image is 64x64 = 4096 tokens. Text is always padded
to 512 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

PIXELS_PER_TOKEN_SIDE = 16


@dataclass(frozen=True)
class ServingEnvelope:
    output_side: tuple[int, int, int] = (256, 1024, 1440)  # min, opt, max pixels per side, multiples of 16
    max_references: int = 4
    reference_side: tuple[int, int, int] = (64, 1024, 2048)  # per side; diffusers rejects < 64
    reference_max_area: int = 1024 * 1024  # pixels; larger references are resized down to it
    batch: tuple[int, int, int] = (1, 1, 4)  # images per request (num_images_per_prompt)
    text_len: int = 512

    def tokens(self, side_px: int) -> int:
        return side_px // PIXELS_PER_TOKEN_SIDE

    def dim_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every dynamic dimension name used in components.graph_specs."""
        out_lo, out_opt, out_hi = (self.tokens(s) for s in self.output_side)
        ref_lo, ref_opt, ref_hi = self.reference_side
        ref_tokens_max = self.max_references * self.reference_max_area // PIXELS_PER_TOKEN_SIDE**2
        ref_tokens_opt = self.tokens(ref_opt) ** 2
        return {
            "batch": self.batch,
            "text_len": (self.text_len,) * 3,
            "height": (ref_lo, ref_opt, ref_hi),  # vae_encoder input (reference pixels)
            "width": (ref_lo, ref_opt, ref_hi),
            "lat_h": (out_lo, out_opt, out_hi),  # output latent grid (cached step, vae_decoder)
            "lat_w": (out_lo, out_opt, out_hi),
            "n_ref": (0, ref_tokens_opt, ref_tokens_max),
        }

    def graph_overrides(self, graph: str) -> dict[str, tuple[int, int, int]]:
        """Per-graph exceptions to the shared ranges."""
        if graph == "vae_encoder":
            return {"batch": (1, 1, 1)}  # references differ in size: encoded one at a time
        if graph == "transformer_prefill":
            # A prefill always has at least one reference (the smallest gives 4x4 tokens).
            _, opt, hi = self.dim_ranges()["n_ref"]
            return {"n_ref": (self.tokens(self.reference_side[0]) ** 2, opt, hi)}
        return {}


DEFAULT_ENVELOPE = ServingEnvelope()


def profile_shapes(spec, envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> dict[str, tuple[tuple, tuple, tuple]]:
    """{input name: (min shape, opt shape, max shape)} of a GraphSpec within the envelope."""
    ranges = {**envelope.dim_ranges(), **envelope.graph_overrides(spec.name)}
    shapes = {}
    for tensor in spec.inputs:
        lo, opt, hi = [], [], []
        for dim in tensor.dims:
            triple = ranges[dim] if isinstance(dim, str) else (dim, dim, dim)
            for acc, value in zip((lo, opt, hi), triple):
                acc.append(value)
        shapes[tensor.name] = (tuple(lo), tuple(opt), tuple(hi))
    return shapes
