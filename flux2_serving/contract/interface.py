"""The public interface of `flux2_klein_kv`, declared once: its tensors (PUBLIC_INPUTS,
PUBLIC_OUTPUTS: the model's config.pbtxt, the clients' tensors and the perf_analyzer data derive
from them) and its request limits (Limits: the envelope's request_limits(), carried to the BLS as
config.pbtxt parameters). Standard library only: a client imports this without the server's
dependencies. Parsing and validating a request is the BLS's (models/request_inputs.py)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from .envelope import DEFAULT_ENVELOPE

DEFAULT_SIDE = DEFAULT_ENVELOPE.output_side[1]  # output side without a reference or a size asked for
DEFAULT_NUM_IMAGES_PER_PROMPT = 1
DEFAULT_NUM_INFERENCE_STEPS = 4  # klein's distilled schedule


@dataclass(frozen=True)
class Field:
    """One tensor of the public interface: Triton wire type (BYTES, INT32, ...) and config.pbtxt dims."""

    name: str
    datatype: str
    dims: tuple
    optional: bool
    doc: str


PUBLIC_INPUTS = (
    Field("prompt", "BYTES", (1,), False, "UTF-8 prompt, non-empty, at most max_prompt_bytes"),
    Field("image", "BYTES", (-1,), True, "0-max_references encoded references (PNG/JPEG/WebP), in order"),
    Field("height", "INT32", (1,), True,
          f"output height, multiple of 16 (default: the first reference's, else {DEFAULT_SIDE})"),
    Field("width", "INT32", (1,), True,
          f"output width, multiple of 16 (default: the first reference's, else {DEFAULT_SIDE})"),
    Field("seed", "INT64", (1,), True,
          ">= 0: torch.Generator(device).manual_seed(seed); absent: a random one (the response's 'seed')"),
    Field("num_images_per_prompt", "INT32", (1,), True,
          f"images per request (default {DEFAULT_NUM_IMAGES_PER_PROMPT})"),
    Field("num_inference_steps", "INT32", (1,), True, f"denoising steps (default {DEFAULT_NUM_INFERENCE_STEPS})"),
    Field("reuse_reference_cache", "BOOL", (1,), True, "false: compute this request's reference K/V afresh"),
)
PUBLIC_OUTPUTS = (
    Field("images", "UINT8", (-1, -1, -1, 3), False, "[N, H, W, 3] RGB images"),
    Field("png", "BYTES", (-1,), False, "the same images PNG-encoded, only when requested (a request that names "
          "no outputs gets every output, png included: name only what you need)"),
    Field("seed", "INT64", (1,), False,
          "the seed of the noise: the one sent, else the random one drawn (send it back to reproduce the images)"),
    Field("notes", "BYTES", (-1,), False,
          "one UTF-8 line per change the server made to the request as diffusers makes it (prompt cut to the text "
          "length, a reference's alpha channel dropped, a reference resized or cropped); empty: none"),
)
# What the project's clients ask for, and the BLS's fallback if a core passed no output names on. A request
# that names no output gets every output: Triton names them all for it, png (every image encoded) included.
DEFAULT_OUTPUTS = ("images", "seed", "notes")
INPUTS = tuple(f.name for f in PUBLIC_INPUTS)


@dataclass(frozen=True)
class GenerationOptions:
    """A request's options beside its prompt and references, with diffusers' names
    (Flux2KleinKVPipeline.__call__; `seed` stands for its generator): the same names are the
    client's keyword arguments and CLI flags, the wire's inputs (PUBLIC_INPUTS), the BLS's parsed
    request and its limits (Limits.max_<name>). None: the server's default."""

    height: int | None = None
    width: int | None = None
    seed: int | None = None
    num_images_per_prompt: int | None = None
    num_inference_steps: int | None = None
    reuse_reference_cache: bool | None = None  # False: compute this request's reference K/V afresh


OPTIONS = tuple(f.name for f in fields(GenerationOptions))


@dataclass(frozen=True)
class Limits:
    """Request limits: the envelope's request_limits(), written into config.pbtxt by the assembler."""

    max_references: int
    max_reference_tokens: int  # the whole ordered set after preprocessing (its K/V size)
    min_reference_side: int  # per side, as sent and after preprocessing
    max_reference_side: int  # per side after preprocessing (area cap and aspect limit guarantee it; checked)
    max_reference_aspect: int
    reference_max_area: int  # larger references are resized down to it, as diffusers does
    max_input_pixels: int  # declared size of an encoded reference, checked before decoding
    max_reference_bytes: int  # encoded size of one reference
    max_prompt_bytes: int  # UTF-8 bytes of the prompt
    min_side: int
    max_side: int
    multiple_of: int
    max_num_images_per_prompt: int
    max_num_inference_steps: int
    default_side: int
    max_batch_transformer_cached: int  # images per cached-step call (the engine's batch)
    max_batch_vae_decoder: int

    @classmethod
    def from_parameters(cls, params: dict) -> Limits:
        return cls(**{k: int(v) for k, v in params.items() if k in cls.__dataclass_fields__})
