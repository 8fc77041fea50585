"""The served FLUX.2 [klein] KV pipeline, without Triton: what `flux2_klein_kv` runs per request.

Request -> tokenizer -> text_encoder -> (references: preprocess -> vae_encoder -> one
transformer_prefill, or their K/V from reference_kv_cache) -> transformer_cached for every step,
step 0 included -> Euler step -> vae_decoder -> uint8 images. Numerics follow
`Flux2KleinKVPipeline.__call__`: same tokenization, reference preprocessing, noise
(`torch.Generator(device).manual_seed(seed)`), sigmas, mu and scheduler.

Components are reached through one injected function, `run(model_name, inputs, output_names)`
-> list of tensors (None for an output the model left out): Triton BLS calls in `model.py`,
onnxruntime sessions in the tests. Torch only; no `triton_python_backend_utils` here.

A request can be stopped between component calls: `should_stop()` (the client went away, or
its deadline passed) is asked before every call, so an abandoned request costs at most the
component call in progress (one denoising step at most).

Per-block reference K/V (`ref_kv_00` ...) travel as a list, never stacked: at 9B one stacked
tensor of the largest reference set would be 2 GiB more, and one tensor of 2^30 elements.

Besides the images a request gets back the seed its noise came from (the one sent, or the random
one drawn: sent back, it reproduces the images) and one note per change made to it as diffusers
makes it (prompt cut to the text length, a reference's alpha dropped, a reference resized or
cropped), the same whether its references were decoded or known from an earlier request.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import compute_empirical_mu, retrieve_timesteps
from diffusers.utils.torch_utils import randn_tensor

from ..contract.interface import Limits
from ..contract.names import CACHE_MODEL, cached_name
from ..contract.reference_key import encoded_reference_key, reference_key
from ..contract.specs import kv_names
from ..modeling.latent_layout import grid_ids, image_ids, pack_latents, text_ids
from .request_inputs import GenerationRequest, header_sizes, load_rgb, output_size, preprocess_reference

Run = Callable[[str, dict, list], list]


@dataclass
class Generated:
    """What one request produced: the images, the seed of their noise and what was changed in the request."""

    images: np.ndarray  # [N, H, W, 3] uint8
    seed: int  # as sent, or drawn at random: sending it back reproduces the images
    notes: list[str] = field(default_factory=list)  # one line per change made to the request, in request order


class Interrupted(Exception):
    """The request was stopped between component calls; `reason` is what should_stop() said."""

    def __init__(self, reason: str, stage: str):
        super().__init__(f"{reason} (before {stage})")
        self.reason, self.stage = reason, stage


def chat_text(tokenizer, prompt: str) -> str:
    """The prompt in the text encoder's chat template, as the pipeline wraps it before tokenizing."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True, enable_thinking=False)


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int):
    """input_ids, attention_mask [B, max_sequence_length], exactly as the pipeline tokenizes.

    `Flux2KleinKVPipeline._get_qwen3_prompt_embeds` tokenizes and encodes in one function; served,
    the two run in different models, so the tokenizer half lives here.
    """
    texts = [chat_text(tokenizer, prompt) for prompt in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                      max_length=max_sequence_length)
    return batch["input_ids"], batch["attention_mask"]


def truncation_note(tokenizer, prompt: str, attention_mask, max_sequence_length: int) -> str | None:
    """A note when the prompt did not fit the text length (tokenize cut it, as diffusers does without
    a word): its token count, chat template included. Counted only when the mask is full."""
    if int(attention_mask.sum()) < max_sequence_length:
        return None
    count = len(tokenizer(chat_text(tokenizer, prompt), truncation=False, verbose=False)["input_ids"])
    if count <= max_sequence_length:
        return None
    return (f"prompt: {count} tokens (chat template included), only the first {max_sequence_length} were used; "
            "the rest was cut, as diffusers does")


class StageClock:
    """Wall seconds per named stage of one request (perf_counter), summed over repeats of a stage:
    `with clock("tokenize"): ...`. Component calls are timed as "call:<model>". The BLS reports
    them as a metric, so the serving overhead can be broken down from the outside."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start


class BoundedCache:
    """A least-recently-used dict of at most `entries` items (0: keeps nothing)."""

    def __init__(self, entries: int):
        self.entries, self.items = entries, OrderedDict()

    def get(self, key):
        value = self.items.get(key)
        if value is not None:
            self.items.move_to_end(key)
        return value

    def put(self, key, value) -> None:
        if self.entries <= 0:
            return
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.entries:
            self.items.popitem(last=False)


def go_on() -> None:
    """should_stop() of a request that nothing stops."""
    return None


class ServedPipeline:
    """One request in, uint8 images out; every component call goes through `run`.

    Per-request work that gives the same result every time is kept (bounded): the tokenizer's
    output per prompt, and per encoded reference set the pixel key and sizes it was found to have
    (`cache_entries` each; 0 keeps nothing). Neither changes a value: both are pure functions of
    the request, and the pixel key is checked again by reference_kv_cache."""

    def __init__(self, run: Run, tokenizer, scheduler_config: dict, dims: dict, dtype: torch.dtype, limits: Limits,
                 device: torch.device, max_sequence_length: int, model_identity: str, cache_entries: int,
                 use_reference_cache: bool = True):
        self.run, self.tokenizer, self.limits = run, tokenizer, limits
        # One scheduler, reset by set_timesteps for every request (from_config per request costs more).
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=16)
        self.dims, self.dtype, self.device = dims, dtype, torch.device(device)  # the export's (manifest.json)
        self.max_sequence_length = max_sequence_length
        # The reference cache's keys cover the references and the identity of the model serving them.
        self.model_identity = model_identity
        self.kv_names = kv_names(dims["kv_layers"])
        self.tokenized = BoundedCache(cache_entries)  # prompt -> (input_ids, attention_mask, truncation note)
        # encoded key -> (pixel key, preprocessed sizes, notes): a repeat is answered as the first request was
        self.known_references = BoundedCache(cache_entries)
        self.known_reference_hits = 0  # requests whose references were not decoded
        self.use_reference_cache = use_reference_cache  # False: reference_kv_cache is never asked
        self.clock = StageClock()
        self.should_stop: Callable[[], str | None] = go_on

    def __call__(self, req: GenerationRequest, clock: StageClock | None = None,
                 should_stop: Callable[[], str | None] | None = None) -> Generated:
        """`should_stop()` -> None to go on, or why to stop (raises Interrupted before the next component call)."""
        # One request at a time per instance (a Triton Python-backend instance executes sequentially).
        self.clock = clock or StageClock()
        self.should_stop = should_stop or go_on
        try:
            return self.generate(req, self.clock)
        finally:  # the BLS's should_stop holds its Triton request: let go of it with the answer (a request
            # kept until the stub's teardown is freed after the stub's shared memory, a crash: issue 28)
            self.should_stop = go_on

    def generate(self, req: GenerationRequest, clock: StageClock) -> Generated:
        """The work of __call__, with its should_stop() in place."""
        # Everything a request can get wrong is checked before the first component runs, and its sizes
        # before any reference is decoded (four 4096^2 PNGs took 2.7 s to decode and resize).
        output_size(req, header_sizes(req, self.limits), self.limits)
        references = self.references(req)
        height, width = output_size(req, references.sizes, self.limits)  # the decoded sizes: the ones used
        references.remember()

        batch = req.num_images_per_prompt
        notes = []
        prompt_embeds = self.encode_prompt(req.prompt, notes).repeat(batch, 1, 1)
        ref_kv = self.reference_kv(references)

        with clock("noise_and_ids"):
            txt_ids = torch.from_numpy(text_ids(prompt_embeds.shape[1]))
            # Noise exactly as prepare_latents: [B, 128, H/16, W/16] from the seeded generator, packed.
            seed = req.seed if req.seed is not None else secrets.randbits(63)
            generator = torch.Generator(self.device).manual_seed(seed)
            shape = (batch, self.dims["in_channels"], height // 16, width // 16)
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
            grid = (batch, height // 16, width // 16)
            img_ids = torch.from_numpy(grid_ids(*grid[1:])).to(self.device)
            latents = pack_latents(latents)

        with clock("scheduler"):
            scheduler = self.scheduler
            steps = req.num_inference_steps
            sigmas = np.linspace(1.0, 1 / steps, steps)
            mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=steps)
            timesteps, _ = retrieve_timesteps(scheduler, steps, self.device, sigmas=sigmas, mu=mu)
            scheduler.set_begin_index(0)
        shared = {"txt_ids": txt_ids.to(self.device), "img_ids": img_ids,
                  **dict(zip(self.kv_names, ref_kv, strict=True))}
        for t in timesteps:
            timestep = (t.expand(batch).to(latents.dtype) / 1000).contiguous()
            # The images of a request share one K/V; the engine takes up to max_batch_transformer_cached
            # of them per call. Samples are independent, so splitting changes no value.
            noise_pred = self.run_in_chunks("transformer_cached", {
                "latents": latents.reshape(*grid, -1), "prompt_embeds": prompt_embeds, "timestep": timestep},
                shared, "noise_pred", self.limits.max_batch_transformer_cached)
            with clock("scheduler"):
                latents = scheduler.step(noise_pred.reshape(latents.shape), t, latents, return_dict=False)[0]

        image = self.run_in_chunks("vae_decoder", {"latents": latents.reshape(*grid, -1)}, {}, "image",
                                   self.limits.max_batch_vae_decoder)
        with clock("postprocess"):
            return Generated(self.to_uint8(image), seed, notes + references.notes)

    @staticmethod
    def to_uint8(image: torch.Tensor) -> np.ndarray:
        """VAE output [N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8 on the host, as
        `Flux2ImageProcessor.postprocess(output_type="np")` then `(x * 255).round()` give it, in tensor
        ops on the serving device so one uint8 copy leaves it, in place after the first op (no new
        buffers). The same operations in the same order, so the same values."""
        x = image.float().mul(0.5).add_(0.5).clamp_(0, 1).mul_(255).round_()
        return x.permute(0, 2, 3, 1).to(torch.uint8, memory_format=torch.contiguous_format).cpu().numpy()

    def call(self, model: str, inputs: dict, outputs: list[str]) -> list:
        """`run`, timed as the stage "call:<model>" (the BLS's side of a component call); first asks
        should_stop()."""
        reason = self.should_stop()
        if reason:
            raise Interrupted(reason, model)
        with self.clock(f"call:{model}"):
            return self.run(model, inputs, outputs)

    def encode_prompt(self, prompt: str, notes: list | None = None) -> torch.Tensor:
        """prompt_embeds [1, max_sequence_length, hidden]; a prompt cut to fit is noted in `notes`."""
        with self.clock("tokenize"):
            tokens = self.tokenized.get(prompt)
            if tokens is None:
                input_ids, attention_mask = tokenize(self.tokenizer, [prompt], self.max_sequence_length)
                note = truncation_note(self.tokenizer, prompt, attention_mask, self.max_sequence_length)
                tokens = input_ids, attention_mask, note
                self.tokenized.put(prompt, tokens)
        input_ids, attention_mask, note = tokens
        if note and notes is not None:
            notes.append(note)
        (embeds,) = self.call("text_encoder", {"input_ids": input_ids.to(self.device),
                                               "attention_mask": attention_mask.to(self.device)}, ["prompt_embeds"])
        return embeds

    def references(self, req: GenerationRequest) -> ReferenceSet:
        """The request's references: on a repeat of the same encoded bytes, their pixel key, sizes and
        notes from the first time (nothing decoded); else decoded, preprocessed and hashed."""
        if not req.images:
            return ReferenceSet(self, req, [], None, notes=[])
        encoded_key = None
        reuse = req.reuse_reference_cache and self.use_reference_cache
        if reuse:
            with self.clock("reference_key"):
                encoded_key = encoded_reference_key(req.encoded)
            known = self.known_references.get(encoded_key)
            if known is not None:
                self.known_reference_hits += 1
                key, sizes, notes = known
                return ReferenceSet(self, req, sizes, key, notes=notes)
        pixels, notes = self.preprocess(req)
        key = None
        if reuse:
            with self.clock("reference_key"):
                key = reference_key(pixels, self.model_identity)
        return ReferenceSet(self, req, [tuple(p.shape[-2:]) for p in pixels], key, pixels, encoded_key, notes)

    def preprocess(self, req: GenerationRequest) -> tuple[list[torch.Tensor], list[str]]:
        """Decode and preprocess the references as Flux2KleinKVPipeline does; with a note per change."""
        notes = []
        with self.clock("preprocess"):
            pixels = [preprocess_reference(load_rgb(image, index, notes), self.image_processor, self.limits, notes,
                                           index)
                      for index, image in enumerate(req.images)]
        return pixels, notes

    def reference_kv(self, references: ReferenceSet) -> list[torch.Tensor]:
        """Per-block K/V of the ordered reference set: from reference_kv_cache when an identical set
        was seen, else VAE encoding + prefill (and stored), unless the request opted out."""
        if references.key is None:
            return self.prefill(references.load())
        key = np.array([references.key.encode()], dtype=np.object_)
        cached_names = [cached_name(name) for name in self.kv_names]
        hit, *ref_kv = self.call(CACHE_MODEL, {"key": key}, ["hit", *cached_names])
        if not bool(hit.reshape(-1)[0]):
            ref_kv = self.prefill(references.load())
            self.call(CACHE_MODEL, {"key": key, **dict(zip(self.kv_names, ref_kv, strict=True))}, ["hit"])
        return ref_kv

    def prefill(self, references) -> list[torch.Tensor]:
        """Per-block reference K/V for the whole ordered reference set, once per request."""
        dims = self.dims
        if not references:
            empty = torch.zeros(2, 0, dims["heads"], dims["head_dim"], dtype=self.dtype, device=self.device)
            return [empty] * len(self.kv_names)
        tokens, grids = [], []
        for image in references:
            (packed,) = self.call("vae_encoder", {"image": image.to(self.device, self.dtype)}, ["ref_latents"])
            tokens.append(packed)
            grids.append((image.shape[-2] // 16, image.shape[-1] // 16))
        ref_ids = torch.from_numpy(image_ids(grids)).to(self.device)
        return self.call("transformer_prefill", {"ref_latents": torch.cat(tokens, dim=1), "ref_ids": ref_ids},
                        self.kv_names)

    def run_in_chunks(self, model: str, batched: dict, shared: dict, output: str, max_batch: int) -> torch.Tensor:
        """Run `model` on the batch axis of `batched` in chunks of at most `max_batch` samples (the
        engine's batch), with `shared` inputs (no batch axis) in every call; outputs concatenated."""
        size = next(iter(batched.values())).shape[0]
        chunks = []
        for start in range(0, size, max_batch):
            inputs = {name: value[start:start + max_batch] for name, value in batched.items()}
            (result,) = self.call(model, {**inputs, **shared}, [output])
            chunks.append(result)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


class ReferenceSet:
    """A request's ordered references: preprocessed sizes, reference_kv_cache key (None: neither
    looked up nor stored), the notes their preprocessing made, and pixels, preprocessed on first use
    when a repeat skipped it."""

    def __init__(self, pipeline: ServedPipeline, req: GenerationRequest, sizes: list, key: str | None,
                 pixels: list | None = None, encoded_key: str | None = None, notes: list | None = None):
        self.pipeline, self.req, self.sizes, self.key = pipeline, req, sizes, key
        self.pixels, self.encoded_key, self.notes = pixels, encoded_key, list(notes or [])

    def load(self) -> list[torch.Tensor]:
        if self.pixels is None:  # the K/V of a known set was evicted: decode after all (its notes are known)
            self.pixels, _ = self.pipeline.preprocess(self.req)
        return self.pixels

    def remember(self) -> None:
        """After every limit passed: a repeat of these bytes may skip decoding (and says what this one said)."""
        if self.encoded_key is not None:
            self.pipeline.known_references.put(self.encoded_key, (self.key, self.sizes, tuple(self.notes)))
