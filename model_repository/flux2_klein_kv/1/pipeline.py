"""The served FLUX.2 [klein] KV pipeline, without Triton: what `flux2_klein_kv` runs per request.

Request -> tokenizer -> text_encoder -> (references: preprocess -> vae_encoder -> one
transformer_prefill, or their K/V from reference_kv_cache) -> transformer_cached for every step,
step 0 included -> Euler step -> vae_decoder -> uint8 images. Numerics follow
`Flux2KleinKVPipeline.__call__`: same tokenization, reference preprocessing, noise
(`torch.Generator(device).manual_seed(seed)`), sigmas, mu and scheduler.

Components are reached through one injected function, `run(model_name, inputs, output_names)`
-> list of tensors (None for an output the model left out): Triton BLS calls in `model.py`,
onnxruntime sessions in the tests. Torch only; no `triton_python_backend_utils` here.

Per-block reference K/V (`ref_kv_00` ...) travel as a list, never stacked: at 9B one stacked
tensor of the largest reference set would be 2 GiB more and over 2^31 elements.
"""

from __future__ import annotations

import secrets
from typing import Callable

import numpy as np
import torch

from reference_key import reference_key
from request_inputs import GenerationRequest, Limits, output_size, preprocess_reference

Run = Callable[[str, dict, list], list]


def tokenize(tokenizer, prompts: list[str], max_sequence_length: int):
    """input_ids, attention_mask [B, max_sequence_length], exactly as the pipeline tokenizes.

    `Flux2KleinKVPipeline._get_qwen3_prompt_embeds` tokenizes and encodes in one function; served,
    the two run in different models, so the tokenizer half lives here.
    """
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                           add_generation_prompt=True, enable_thinking=False)
             for prompt in prompts]
    batch = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                      max_length=max_sequence_length)
    return batch["input_ids"], batch["attention_mask"]


class ServedPipeline:
    """One request in, uint8 images out; every component call goes through `run`."""

    def __init__(self, run: Run, tokenizer, scheduler_config: dict, dims: dict, dtype: torch.dtype, limits: Limits,
                 device: torch.device, max_sequence_length: int, model_identity: str):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor

        self.run, self.tokenizer, self.limits = run, tokenizer, limits
        self.scheduler_config, self.scheduler_cls = scheduler_config, FlowMatchEulerDiscreteScheduler
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=16)
        self.dims, self.dtype, self.device = dims, dtype, torch.device(device)  # the export's (manifest.json)
        self.max_sequence_length = max_sequence_length
        # The reference cache's keys cover the references and the identity of the model serving them.
        self.model_identity = model_identity
        self.kv_names = [f"ref_kv_{index:02d}" for index in range(dims["kv_layers"])]

    def __call__(self, req: GenerationRequest) -> np.ndarray:
        from diffusers import Flux2KleinKVPipeline as P
        from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import compute_empirical_mu, retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        # Everything a request can get wrong is checked before the first component runs.
        references = [preprocess_reference(image, self.image_processor, self.limits) for image in req.images]
        height, width = output_size(req, references, self.limits)

        batch = req.num_images
        prompt_embeds = self.encode_prompt(req.prompt).repeat(batch, 1, 1)
        txt_ids = P._prepare_text_ids(prompt_embeds)[0]
        ref_kv = self.reference_kv(references, req.reuse_reference_cache)

        # Noise exactly as prepare_latents: [B, 128, H/16, W/16] from the seeded generator, packed.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (batch, self.dims["in_channels"], height // 16, width // 16)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        grid = (batch, height // 16, width // 16)
        img_ids = P._prepare_latent_ids(latents)[0].reshape(*grid[1:], 4).to(self.device)
        latents = P._pack_latents(latents)

        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        sigmas = np.linspace(1.0, 1 / req.steps, req.steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=req.steps)
        timesteps, _ = retrieve_timesteps(scheduler, req.steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        shared = {"txt_ids": txt_ids.to(self.device), "img_ids": img_ids, **dict(zip(self.kv_names, ref_kv))}
        for t in timesteps:
            timestep = (t.expand(batch).to(latents.dtype) / 1000).contiguous()
            # The images of a request share one K/V; the engine takes up to max_batch_transformer_cached
            # of them per call. Samples are independent, so splitting changes no value.
            noise_pred = self.run_in_chunks("transformer_cached", {
                "latents": latents.reshape(*grid, -1), "prompt_embeds": prompt_embeds, "timestep": timestep},
                shared, "noise_pred", self.limits.max_batch_transformer_cached)
            latents = scheduler.step(noise_pred.reshape(latents.shape), t, latents, return_dict=False)[0]

        image = self.run_in_chunks("vae_decoder", {"latents": latents.reshape(*grid, -1)}, {}, "image",
                                   self.limits.max_batch_vae_decoder)
        image = self.image_processor.postprocess(image.float().cpu(), output_type="np")
        return (image * 255).round().astype(np.uint8)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        input_ids, attention_mask = tokenize(self.tokenizer, [prompt], self.max_sequence_length)
        (embeds,) = self.run("text_encoder", {"input_ids": input_ids.to(self.device),
                                              "attention_mask": attention_mask.to(self.device)}, ["prompt_embeds"])
        return embeds

    def reference_kv(self, references, reuse: bool) -> list[torch.Tensor]:
        """Per-block K/V of the ordered reference set: from reference_kv_cache when an identical set
        was seen, else VAE encoding + prefill (and stored), unless the request opted out."""
        if not references or not reuse:
            return self.prefill(references)
        key = np.array([reference_key(references, self.model_identity).encode()], dtype=np.object_)
        cached_names = ["cached" + name[3:] for name in self.kv_names]
        hit, *ref_kv = self.run("reference_kv_cache", {"key": key}, ["hit", *cached_names])
        if not bool(hit.reshape(-1)[0]):
            ref_kv = self.prefill(references)
            self.run("reference_kv_cache", {"key": key, **dict(zip(self.kv_names, ref_kv))}, ["hit"])
        return ref_kv

    def prefill(self, references) -> list[torch.Tensor]:
        """Per-block reference K/V for the whole ordered reference set, once per request."""
        from diffusers import Flux2KleinKVPipeline as P

        dims = self.dims
        if not references:
            empty = torch.zeros(2, 0, dims["heads"], dims["head_dim"], dtype=self.dtype, device=self.device)
            return [empty] * len(self.kv_names)
        tokens, grids = [], []
        for image in references:
            (packed,) = self.run("vae_encoder", {"image": image.to(self.device, self.dtype)}, ["ref_latents"])
            tokens.append(packed)
            grids.append(torch.empty(1, 1, image.shape[-2] // 16, image.shape[-1] // 16))
        ref_ids = P._prepare_image_ids(grids)[0].to(self.device)
        return self.run("transformer_prefill", {"ref_latents": torch.cat(tokens, dim=1), "ref_ids": ref_ids},
                        self.kv_names)

    def run_in_chunks(self, model: str, batched: dict, shared: dict, output: str, max_batch: int) -> torch.Tensor:
        """Run `model` on the batch axis of `batched` in chunks of at most `max_batch` samples (the
        engine's batch), with `shared` inputs (no batch axis) in every call; outputs concatenated."""
        size = next(iter(batched.values())).shape[0]
        chunks = []
        for start in range(0, size, max_batch):
            inputs = {name: value[start:start + max_batch] for name, value in batched.items()}
            (result,) = self.run(model, {**inputs, **shared}, [output])
            chunks.append(result)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
