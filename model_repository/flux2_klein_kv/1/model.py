"""flux2_klein_kv: the public BLS model orchestrating the component models.

Request -> tokenizer -> text_encoder -> (references: preprocess -> vae_encoder -> one
transformer_prefill) -> transformer_cached for every step, step 0 included -> Euler step
-> vae_decoder -> uint8 images (+ PNGs when asked for). Numerics follow
`Flux2KleinKVPipeline.__call__`: same tokenization, reference preprocessing, noise
(`torch.Generator(device).manual_seed(seed)`), sigmas, mu and scheduler.

Every component output is requested in the BLS's own memory (`preferred_memory`: GPU for
`cuda:N`, CPU for `cpu`), and checked to be there, so the scheduler step never mixes devices.
Tensors go to other models as DLPack producers (the torch tensor itself, not a capsule): the
Python backend then synchronises the producing stream before the request runs.

Per-block reference K/V (`ref_kv_00` ...) travel as a list, never stacked: at 9B one stacked
tensor of the largest reference set would be 4 GiB more and over 2^31 elements.
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
from request_inputs import InvalidInput, Limits, output_size, parse, preprocess_reference  # noqa: E402

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
        self.kv_names = [f"ref_kv_{index:02d}" for index in range(self.manifest["dims"]["kv_layers"])]
        # Outputs of every model we call arrive in our memory: TensorRT would otherwise hand GPU
        # tensors to a CPU BLS (and the scheduler step would mix devices).
        if self.device.type == "cuda":
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index or 0)
        else:
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        # Where component outputs arrived, counted per device: on a GPU server everything should say cuda.
        self.output_family = pb_utils.MetricFamily(
            name="flux2_bls_component_outputs_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Tensors the BLS received from component models, by the device they arrived on")
        self.output_labels = {"model": args["model_name"], "version": args["model_version"]}
        self.output_metrics = {}

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
        shape = (batch, self.manifest["dims"]["in_channels"], height // 16, width // 16)
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
            noise_pred = self.infer_in_chunks("transformer_cached", {
                "latents": latents.reshape(*grid, -1), "prompt_embeds": prompt_embeds, "timestep": timestep},
                shared, "noise_pred", self.limits.max_batch_transformer_cached)
            latents = scheduler.step(noise_pred.reshape(latents.shape), t, latents, return_dict=False)[0]

        image = self.infer_in_chunks("vae_decoder", {"latents": latents.reshape(*grid, -1)}, {}, "image",
                                     self.limits.max_batch_vae_decoder)
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

    def reference_kv(self, references, reuse: bool) -> list[torch.Tensor]:
        """Per-block K/V of the ordered reference set: from reference_kv_cache when an identical set
        was seen, else VAE encoding + prefill (and stored), unless the request opted out."""
        if not references or not reuse:
            return self.prefill(references)
        key = np.array([reference_key(references, self.model_identity).encode()], dtype=np.object_)
        cached_names = ["cached" + name[3:] for name in self.kv_names]
        hit, *ref_kv = self.infer("reference_kv_cache", {"key": key}, ["hit", *cached_names])
        if not bool(hit.reshape(-1)[0]):
            ref_kv = self.prefill(references)
            self.infer("reference_kv_cache", {"key": key, **dict(zip(self.kv_names, ref_kv))}, ["hit"])
        return ref_kv

    def prefill(self, references) -> list[torch.Tensor]:
        """Per-block reference K/V for the whole ordered reference set, once per request."""
        from diffusers import Flux2KleinKVPipeline as P

        dims = self.manifest["dims"]
        if not references:
            empty = torch.zeros(2, 0, dims["heads"], dims["head_dim"], dtype=self.dtype, device=self.device)
            return [empty] * len(self.kv_names)
        tokens, grids = [], []
        for image in references:
            (packed,) = self.infer("vae_encoder", {"image": image.to(self.device, self.dtype)}, ["ref_latents"])
            tokens.append(packed)
            grids.append(torch.empty(1, 1, image.shape[-2] // 16, image.shape[-1] // 16))
        ref_ids = P._prepare_image_ids(grids)[0].to(self.device)
        return self.infer("transformer_prefill", {"ref_latents": torch.cat(tokens, dim=1), "ref_ids": ref_ids},
                          self.kv_names)

    # ------------------------------------------------------------------ BLS call

    def infer(self, model: str, inputs: dict, outputs: list[str]) -> list[torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[_to_triton(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
            preferred_memory=self.preferred_memory,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        results = [_from_triton(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]
        for name, tensor in zip(outputs, results):  # None: an output the model left out (a cache miss)
            if tensor is None:
                continue
            self._count_output(tensor.device.type)
            if tensor.device.type != self.device.type:
                raise RuntimeError(f"{model} returned '{name}' on {tensor.device}, not on the BLS's {self.device}")
        return results

    def _count_output(self, device: str) -> None:
        if device not in self.output_metrics:
            self.output_metrics[device] = self.output_family.Metric(labels={**self.output_labels, "device": device})
        self.output_metrics[device].increment(1)

    def infer_in_chunks(self, model: str, batched: dict, shared: dict, output: str, max_batch: int) -> torch.Tensor:
        """Run `model` on the batch axis of `batched` in chunks of at most `max_batch` samples (the
        engine's batch), with `shared` inputs (no batch axis) in every call; outputs concatenated."""
        size = next(iter(batched.values())).shape[0]
        chunks = []
        for start in range(0, size, max_batch):
            inputs = {name: value[start:start + max_batch] for name, value in batched.items()}
            (result,) = self.infer(model, {**inputs, **shared}, [output])
            chunks.append(result)
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _to_triton(name: str, value):
    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    value = value.contiguous()
    if value.device.type == "cpu" and value.dtype != torch.bfloat16:
        return pb_utils.Tensor(name, value.numpy())
    # The tensor itself, not a capsule: Python backend calls __dlpack__(stream=...) and synchronises,
    # so the request never reads a GPU buffer that a kernel is still writing.
    return pb_utils.Tensor.from_dlpack(name, value)


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
