"""flux2_klein_kv: the public BLS model orchestrating the component models.

Request -> tokenizer -> text_encoder -> (references: preprocess -> vae_encoder -> one
transformer_prefill) -> transformer_cached for every step, step 0 included -> Euler step
-> vae_decoder -> uint8 images (+ PNGs when asked for). Numerics follow
`Flux2KleinKVPipeline.__call__`: same tokenization, reference preprocessing, noise
(`torch.Generator(device).manual_seed(seed)`), sigmas, mu and scheduler.

Tensors pass between models by DLPack, so on a GPU they stay on the device (with
FORCE_CPU_ONLY_INPUT_TENSORS "no" and preferred GPU memory for BLS outputs).
"""

from __future__ import annotations

import hashlib
import io
import json
import secrets
import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from reference_key import reference_key  # noqa: E402
from request_inputs import InvalidInput, Limits, parse  # noqa: E402

INPUTS = ("prompt", "image", "height", "width", "seed", "num_images_per_prompt", "num_inference_steps",
          "reuse_reference_cache")


class TritonPythonModel:
    def initialize(self, args):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.pipelines.flux2.image_processor import Flux2ImageProcessor
        from transformers import AutoTokenizer

        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        here = Path(args["model_repository"]) / args["model_version"]
        self.limits = Limits.from_parameters(params)
        self.device = torch.device(params.get("device", "cpu"))
        self.max_sequence_length = int(params.get("max_sequence_length", 512))
        manifest = (here / "manifest.json").read_bytes()
        self.manifest = json.loads(manifest)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.manifest["dtype"]]
        self.tokenizer = AutoTokenizer.from_pretrained(here / "tokenizer")
        self.scheduler_config = FlowMatchEulerDiscreteScheduler.load_config(here / "scheduler")
        self.scheduler_cls = FlowMatchEulerDiscreteScheduler
        self.image_processor = Flux2ImageProcessor(vae_scale_factor=16)
        # Reference K/V reuse across requests goes through the single-instance reference_kv_cache
        # model (shared by all BLS instances); keys cover the references and this model's identity.
        manifest_digest = hashlib.sha256(manifest).hexdigest()[:16]
        self.model_identity = f"{args['model_name']}:{args['model_version']}:{manifest_digest}"
        self.preferred_memory = None
        if self.device.type == "cuda":
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index or 0)

    # ------------------------------------------------------------------ Triton entry point

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                responses.append(self._serve(request))
            except InvalidInput as exc:
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)))
            except Exception as exc:  # noqa: BLE001 - report, keep serving
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"internal error: {type(exc).__name__}: {exc}")))
        return responses

    def _serve(self, request):
        tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
        parsed = parse({k: v.as_numpy() for k, v in tensors.items() if v is not None}, self.limits)
        images = self.generate(parsed)  # [N, H, W, 3] uint8
        outputs = [pb_utils.Tensor("images", images)]
        if "png" in request.requested_output_names():
            outputs.append(pb_utils.Tensor("png", np.array([_png(image) for image in images], dtype=np.object_)))
        return pb_utils.InferenceResponse(outputs)

    # ------------------------------------------------------------------ the pipeline

    def generate(self, req) -> np.ndarray:
        from diffusers import Flux2KleinKVPipeline as P
        from diffusers.pipelines.flux2.pipeline_flux2_klein_kv import compute_empirical_mu, retrieve_timesteps
        from diffusers.utils.torch_utils import randn_tensor

        batch = req.num_images
        prompt_embeds = self.encode_prompt(req.prompt).repeat(batch, 1, 1)
        txt_ids = P._prepare_text_ids(prompt_embeds)[0]

        references = [self.preprocess_reference(image) for image in req.images]
        height, width = req.height, req.width
        if references:
            ref_h, ref_w = references[0].shape[-2:]
            height, width = height or ref_h, width or ref_w
        height, width = height or self.limits.default_side, width or self.limits.default_side
        for name, value in (("height", height), ("width", width)):
            if not self.limits.min_side <= value <= self.limits.max_side:
                raise InvalidInput(f"output {name} {value} (taken from image[0]) is outside "
                                   f"[{self.limits.min_side}, {self.limits.max_side}]; pass '{name}' explicitly")
        ref_kv = self.reference_kv(references, req.reuse_reference_cache)

        # Noise exactly as prepare_latents: [B, 128, H/16, W/16] from the seeded generator, packed.
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        generator = torch.Generator(self.device).manual_seed(seed)
        shape = (batch, self.manifest["dims"]["in_channels"], height // 16, width // 16)
        latents = randn_tensor(shape, generator=generator, device=self.device, dtype=self.dtype)
        # The cached-step graph takes per-sample K/V and ids, in the latent grid layout, so Triton
        # can batch it with other requests' steps; one K/V (computed once) is repeated per image.
        grid = (batch, height // 16, width // 16)
        img_ids = P._prepare_latent_ids(latents)[0].reshape(1, *grid[1:], 4).expand(*grid, 4).contiguous()
        txt_ids = txt_ids.unsqueeze(0).expand(batch, -1, -1).contiguous()
        step_kv = ref_kv.unsqueeze(0).expand(batch, *ref_kv.shape).contiguous()
        latents = P._pack_latents(latents)

        scheduler = self.scheduler_cls.from_config(self.scheduler_config)
        sigmas = np.linspace(1.0, 1 / req.steps, req.steps)
        mu = compute_empirical_mu(image_seq_len=latents.shape[1], num_steps=req.steps)
        timesteps, _ = retrieve_timesteps(scheduler, req.steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        for t in timesteps:
            timestep = (t.expand(batch, 1).to(latents.dtype) / 1000).contiguous()  # [B, 1]: see config reshape
            (noise_pred,) = self.infer("transformer_cached", {
                "latents": latents.reshape(*grid, -1).contiguous(), "prompt_embeds": prompt_embeds,
                "timestep": timestep, "img_ids": img_ids.to(self.device), "txt_ids": txt_ids.to(self.device),
                "ref_kv": step_kv}, ["noise_pred"])
            latents = scheduler.step(noise_pred.reshape(latents.shape), t, latents, return_dict=False)[0]

        (image,) = self.infer("vae_decoder", {"latents": latents.reshape(*grid, -1).contiguous()}, ["image"])
        image = self.image_processor.postprocess(image.float().cpu(), output_type="np")
        return (image * 255).round().astype(np.uint8)

    def encode_prompt(self, prompt: str) -> torch.Tensor:
        texts = [self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                                    add_generation_prompt=True, enable_thinking=False)]
        tokens = self.tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                                max_length=self.max_sequence_length)
        (embeds,) = self.infer("text_encoder", {"input_ids": tokens["input_ids"].to(self.device),
                                                "attention_mask": tokens["attention_mask"].to(self.device)},
                               ["prompt_embeds"])
        return embeds

    def preprocess_reference(self, image) -> torch.Tensor:
        """As Flux2KleinKVPipeline.__call__: cap the area at 1024^2, crop to multiples of 16."""
        if image.width * image.height > 1024 * 1024:
            image = self.image_processor._resize_to_target_area(image, 1024 * 1024)
        width, height = (image.width // 16) * 16, (image.height // 16) * 16
        return self.image_processor.preprocess(image, height=height, width=width, resize_mode="crop")

    def reference_kv(self, references, reuse: bool) -> torch.Tensor:
        """K/V of the ordered reference set: from reference_kv_cache when an identical set was
        seen, else VAE encoding + prefill (and stored), unless the request opted out."""
        if not references or not reuse:
            return self.prefill(references)
        key = np.array([reference_key(references, self.model_identity).encode()], dtype=np.object_)
        hit, ref_kv = self.infer("reference_kv_cache", {"key": key}, ["hit", "cached_kv"])
        if not bool(hit.reshape(-1)[0]):
            ref_kv = self.prefill(references)
            self.infer("reference_kv_cache", {"key": key, "ref_kv": ref_kv}, ["hit"])
        return ref_kv

    def prefill(self, references) -> torch.Tensor:
        """Reference K/V for the whole ordered reference set, once per request (batch 1)."""
        from diffusers import Flux2KleinKVPipeline as P

        dims = self.manifest["dims"]
        if not references:
            return torch.zeros(dims["kv_layers"], 2, 0, dims["heads"], dims["head_dim"],
                               dtype=self.dtype, device=self.device)
        tokens, grids = [], []
        for image in references:
            (packed,) = self.infer("vae_encoder", {"image": image.to(self.device, self.dtype).contiguous()},
                                   ["ref_latents"])
            tokens.append(packed)
            grids.append(torch.empty(1, 1, image.shape[-2] // 16, image.shape[-1] // 16))
        ref_ids = P._prepare_image_ids(grids)[0].to(self.device)
        (ref_kv,) = self.infer("transformer_prefill", {"ref_latents": torch.cat(tokens, dim=1).contiguous(),
                                                       "ref_ids": ref_ids.contiguous()}, ["ref_kv"])
        return ref_kv

    # ------------------------------------------------------------------ BLS call

    def infer(self, model: str, inputs: dict, outputs: list[str]) -> list[torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[_to_triton(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
            **({"preferred_memory": self.preferred_memory} if self.preferred_memory else {}),
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return [_from_triton(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]  # None: absent


def _to_triton(name: str, value):
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    if value.device.type == "cpu" and value.dtype != torch.bfloat16:
        return pb_utils.Tensor(name, value.contiguous().numpy())
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(value.contiguous()))


def _from_triton(tensor) -> torch.Tensor | None:
    if tensor is None:
        return None
    if tensor.is_cpu():
        try:
            return torch.from_numpy(tensor.as_numpy())
        except Exception:  # noqa: BLE001 - bf16 has no numpy type: go through DLPack
            pass
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack())


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()
