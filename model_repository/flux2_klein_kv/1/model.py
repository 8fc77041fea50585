"""flux2_klein_kv: the public BLS model. Triton plumbing only: parse and validate the request
(request_inputs.py), run the pipeline (pipeline.py), answer; component calls are BLS requests.

Every component output is requested in the BLS's own memory (`preferred_memory`: GPU for
`cuda:N`, CPU for `cpu`), checked to be there and counted per device, so the scheduler step never
mixes devices. Tensors go to other models as DLPack producers (the torch tensor itself, not a
capsule): the Python backend then synchronises the producing stream before the request runs.
"""

from __future__ import annotations

import functools
import hashlib
import io
import sys
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).parent))
from flux2_export.loading import DTYPES  # noqa: E402 - export/ modules, copied here by the assembler
from flux2_export.manifest import read as read_manifest  # noqa: E402
from pipeline import ServedPipeline, StageClock  # noqa: E402
from request_inputs import INPUTS, InvalidInput, Limits, parse  # noqa: E402
from triton_io import model_config, to_torch, to_triton  # noqa: E402 - copied here by the assembler


class TritonPythonModel:
    def initialize(self, args):
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import AutoTokenizer

        _, params = model_config(args)
        here = Path(args["model_repository"]) / args["model_version"]
        self.limits = Limits.from_parameters(params)
        self.device = torch.device(params.get("device", "cpu"))
        manifest = read_manifest(here)
        # Reference K/V reuse goes through the single-instance reference_kv_cache model (shared by all
        # BLS instances); its keys cover the references and this model's identity.
        digest = hashlib.sha256((here / "manifest.json").read_bytes()).hexdigest()[:16]
        identity = f"{args['model_name']}:{args['model_version']}:{digest}"
        self.pipeline = ServedPipeline(
            self.infer, AutoTokenizer.from_pretrained(here / "tokenizer"),
            FlowMatchEulerDiscreteScheduler.load_config(here / "scheduler"), manifest.dims, DTYPES[manifest.dtype],
            self.limits, self.device, int(params.get("max_sequence_length", 512)), identity,
            cache_entries=int(params.get("request_cache_entries", 1024)))
        self.encode_png = png_encoder(params.get("png_encoder", "fpng"))
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
        self.labelled_metrics = {}  # (label, value) -> metric, made on first use (_increment)
        # Where a request's time goes inside the BLS (component calls as "call:<model>"): with Triton's
        # per-model statistics this breaks the serving overhead down (bench/overhead.py reads both).
        self.stage_family = pb_utils.MetricFamily(
            name="flux2_bls_stage_seconds_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Wall seconds the BLS spent per request stage, summed over requests")
        self.known_family = pb_utils.MetricFamily(
            name="flux2_reference_cache_encoded_key_hits_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests whose reference bytes this BLS instance had seen: the references were not decoded")
        self.known_metric = self.known_family.Metric(labels=self.output_labels)
        self.known_reported = 0

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
        clock = StageClock()
        with clock("parse"):
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
            parsed = parse({k: v.as_numpy() for k, v in tensors.items() if v is not None}, self.limits)
        images = self.pipeline(parsed, clock)  # [N, H, W, 3] uint8
        requested = request.requested_output_names() or {"images"}  # a client naming none gets images
        outputs = []
        if "png" in requested:
            with clock("png"):
                outputs.append(pb_utils.Tensor("png", np.array([self.encode_png(image) for image in images],
                                                               dtype=np.object_)))
        if "images" in requested:
            with clock("response"):
                outputs.append(pb_utils.Tensor("images", images))
        self._report_stages(clock)
        return pb_utils.InferenceResponse(outputs)

    def _report_stages(self, clock: StageClock) -> None:
        self.known_metric.increment(self.pipeline.known_reference_hits - self.known_reported)
        self.known_reported = self.pipeline.known_reference_hits
        for stage, seconds in clock.seconds.items():
            self._increment(self.stage_family, "stage", stage, seconds)

    # ------------------------------------------------------------------ BLS call

    def infer(self, model: str, inputs: dict, outputs: list[str]) -> list[torch.Tensor]:
        request = pb_utils.InferenceRequest(
            model_name=model,
            inputs=[to_triton(name, value) for name, value in inputs.items()],
            requested_output_names=outputs,
            preferred_memory=self.preferred_memory,
        )
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        results = [to_torch(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]
        for name, tensor in zip(outputs, results):  # None: an output the model left out (a cache miss)
            if tensor is None:
                continue
            self._increment(self.output_family, "device", tensor.device.type, 1)
            if tensor.device.type != self.device.type:
                raise RuntimeError(f"{model} returned '{name}' on {tensor.device}, not on the BLS's {self.device}")
        return results

    def _increment(self, family, label: str, value: str, amount: float) -> None:
        """Add `amount` to `family`'s metric for {label: value} (with this model's labels), made on first use."""
        if (label, value) not in self.labelled_metrics:
            self.labelled_metrics[label, value] = family.Metric(labels={**self.output_labels, label: value})
        self.labelled_metrics[label, value].increment(amount)


def png_encoder(name: str):
    """image [H, W, 3] uint8 -> PNG bytes. "fpng" (the fpng library: ~15x faster than Pillow at 1024^2,
    files within a few % of Pillow's fastest level; see BENCHMARKS.md), or Pillow at compress level N
    ("pillow:N", Pillow's default is 6). Without fpng installed (it ships x86-64 wheels only),
    Pillow at level 1. Lossless either way: the pixels are the `images` output's."""
    if name == "fpng":
        try:
            import fpng

            return fpng.from_ndarray
        except ImportError:
            pb_utils.Logger.log_warn("png_encoder 'fpng': the fpng package is not installed; using Pillow, level 1")
            name = "pillow:1"
    kind, _, level = name.partition(":")
    if kind != "pillow":
        raise ValueError(f"png_encoder must be 'fpng' or 'pillow:<0-9>', got {name!r}")
    return functools.partial(_pillow_png, level=int(level or 6))


def _pillow_png(image: np.ndarray, level: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()
