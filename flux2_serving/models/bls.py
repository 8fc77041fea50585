"""flux2_klein_kv: the public BLS model. Triton plumbing only: parse and validate the request
(request_inputs.py against contract/interface.py), run the pipeline (pipeline.py), answer; component
calls are BLS requests. The answer holds the outputs the client named (Triton names every output
for a client that names none; `png`, the costly one, is encoded only when named).

Every component output is requested in the BLS's own memory (`preferred_memory`: GPU for
`cuda:N`, CPU for `cpu`), checked to be there and counted per device, so the scheduler step never
mixes devices. Tensors go to other models as DLPack producers (the torch tensor itself, not a
capsule): the Python backend then synchronises the producing stream before the request runs.

Every request ends with one outcome, counted in `flux2_bls_requests_total{outcome}`: ok, invalid
(INVALID_ARG naming the field), cancelled (the client went away: gRPC cancel or deadline),
timeout (the request's own `timeout` parameter passed; UNAVAILABLE), overloaded (a component's
queue was full; UNAVAILABLE) or failed (INTERNAL, a server fault; the traceback goes to the log,
not to the caller). Requests refused by this model's own bounded queue never reach it: Triton
answers them UNAVAILABLE "Exceeds maximum queue size" / "Request timeout expired".
"""

from __future__ import annotations

import functools
import hashlib
import io
import time
import traceback
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from diffusers import FlowMatchEulerDiscreteScheduler
from PIL import Image
from transformers import AutoTokenizer

from ..contract.heap import keep_freed_memory
from ..contract.interface import DEFAULT_OUTPUTS, INPUTS, Limits
from ..contract.manifest import read as read_manifest
from ..contract.names import BLS_MODEL, BLS_OVERLOADED, DEAD_PROCESS, PROCESS_REPLACED, QUEUE_FULL, SHUTTING_DOWN
from ..contract.security import INTERNAL_PARAMETER, internal_secret
from ..modeling.loading import DTYPES
from .pipeline import Interrupted, ServedPipeline, StageClock
from .readiness import Readiness
from .request_inputs import InvalidInput, parse
from .triton_io import before_teardown, lasting, model_config, to_torch, to_triton

OUTCOMES = ("ok", "invalid", "cancelled", "timeout", "overloaded", "failed")


class ComponentError(RuntimeError):
    """A component model answered with an error; `overloaded` when its queue was full, `stopping`
    when the server is shutting down."""

    def __init__(self, model: str, message: str):
        super().__init__(f"{model}: {message}")
        self.overloaded = QUEUE_FULL in message
        self.stopping = SHUTTING_DOWN in message
        self.dead = DEAD_PROCESS in message  # its process died (the supervisor replaces it)


class TritonPythonModel:
    def initialize(self, args):
        _, params = model_config(args)
        keep_freed_memory()  # MiB-sized tensors every request: no page faults for each (contract/heap.py)
        here = Path(args["model_repository"]) / args["model_version"]
        self.limits = Limits.from_parameters(params)
        self.device = torch.device(params.get("device", "cpu"))
        manifest = read_manifest(here)
        # Reference K/V reuse goes through the single-instance reference_kv_cache model (shared by all
        # BLS instances); its keys cover the references and this model's identity.
        digest = hashlib.sha256((here / "manifest.json").read_bytes()).hexdigest()[:16]
        identity = f"{args['model_name']}:{args['model_version']}:{digest}"
        # Every model this one calls answers only requests that carry the server's internal secret
        # (tritonserver's environment, flux2_serving/contract/security.py): reference_kv_cache and the
        # Python-backend components check it (those refuse to load without one); TensorRT engines cannot.
        # Without a secret the cache is not used at all.
        self.secret = internal_secret()
        if self.secret is None:
            pb_utils.Logger.log_warn("no internal secret in the environment (FLUX2_INTERNAL_SECRET): reference K/V "
                                     "is computed for every request and Python-backend components do not load; "
                                     "start tritonserver with flux2_serving.server.launch or serve")
        self.pipeline = ServedPipeline(
            self.infer, AutoTokenizer.from_pretrained(here / "tokenizer"),
            FlowMatchEulerDiscreteScheduler.load_config(here / "scheduler"), manifest.dims, DTYPES[manifest.dtype],
            self.limits, self.device, int(params["max_sequence_length"]), identity,
            cache_entries=int(params["request_cache_entries"]), use_reference_cache=self.secret is not None)
        self.encode_png = png_encoder(params["png_encoder"])
        self.readiness = Readiness()
        # Outputs of every model we call arrive in our memory: TensorRT would otherwise hand GPU
        # tensors to a CPU BLS (and the scheduler step would mix devices).
        if self.device.type == "cuda":
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, self.device.index or 0)
        else:
            self.preferred_memory = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
        # Where component outputs arrived, counted per device: on a GPU server everything should say cuda.
        self.output_family = lasting(pb_utils.MetricFamily(
            name="flux2_bls_component_outputs_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Tensors the BLS received from component models, by the device they arrived on"))
        self.output_labels = {"model": args["model_name"], "version": args["model_version"]}
        self.labelled_metrics = {}  # (label, value) -> metric, made on first use (_increment)
        # Every increment is a round trip to tritonserver that the request waits for (python_backend's
        # Metric::SendIncrementRequest answers only after the parent process has applied it): 0.05-0.8 ms
        # each on the 2-core bench machine. So a request's arrivals are added up here and reported once per
        # device when it is answered, and counters that did not move are not sent.
        self.arrived: dict[str, int] = {}  # device type -> component outputs received since the last report
        # Where a request's time goes inside the BLS (component calls as "call:<model>"): with Triton's
        # per-model statistics this breaks the serving overhead down (bench/overhead.py reads both).
        self.stage_family = lasting(pb_utils.MetricFamily(
            name="flux2_bls_stage_seconds_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Wall seconds the BLS spent per request stage, summed over requests"))
        self.known_family = lasting(pb_utils.MetricFamily(
            name="flux2_reference_cache_encoded_key_hits_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests whose reference bytes this BLS instance had seen: the references were not decoded"))
        self.known_metric = lasting(self.known_family.Metric(labels=self.output_labels))
        self.known_reported = 0
        self.outcome_family = lasting(pb_utils.MetricFamily(
            name="flux2_bls_requests_total", kind=pb_utils.MetricFamily.COUNTER,
            description="Requests the BLS answered, by outcome (ok, invalid, cancelled, timeout, overloaded, failed)"))
        for outcome in OUTCOMES:  # every series exists from the start (rate() needs a first sample)
            self._increment(self.outcome_family, "outcome", outcome, 0)

    def finalize(self):
        """Let go of every Triton object but the metrics (lasting()) while this process's stub is whole: the
        stub frees what is left only after it has released its shared memory, and a Triton object freed
        then crashes it (issue 28, triton_io.before_teardown). The pipeline refers back to this model
        (self.infer), so both would otherwise wait for Python's teardown."""
        self.pipeline = None
        before_teardown()

    def is_ready(self) -> bool:
        """Asked by Triton 26.03 and later on every readiness request of this model (python_backend PR #430; 2.51
        never asks): False once finalized, and for a while after a component it calls was found dead
        (readiness.py), so that a readiness probe drains the replica while the component is reloaded."""
        return getattr(self, "pipeline", None) is not None and self.readiness.ready()

    # ------------------------------------------------------------------ Triton entry point

    def execute(self, requests):
        responses = []
        for request in requests:
            outcome, response = self._answer(request)
            self._increment(self.outcome_family, "outcome", outcome, 1)
            for device, count in self.arrived.items():
                self._increment(self.output_family, "device", device, count)
            self.arrived.clear()
            responses.append(response)
        return responses

    def _answer(self, request) -> tuple[str, object]:
        """(outcome, response) for one request. Every error response gets its own TritonError: one
        error object shared by several responses crashed tritonserver 2.51."""
        def error(message: str, code) -> object:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))

        try:
            return "ok", self._serve(request)
        except InvalidInput as exc:
            return "invalid", error(str(exc), pb_utils.TritonError.INVALID_ARG)
        except Interrupted as exc:
            if exc.reason == "cancelled":
                return "cancelled", error(f"cancelled by the client ({exc})", pb_utils.TritonError.CANCELLED)
            return "timeout", error(f"{exc}", pb_utils.TritonError.UNAVAILABLE)
        except ComponentError as exc:
            if exc.overloaded:
                return "overloaded", error(f"{BLS_OVERLOADED}: {exc}", pb_utils.TritonError.UNAVAILABLE)
            if exc.stopping:
                return "failed", error("the server is shutting down: send the request again (to another replica)",
                                       pb_utils.TritonError.UNAVAILABLE)
            if exc.dead:
                return "failed", error(f"{exc} {PROCESS_REPLACED}", pb_utils.TritonError.UNAVAILABLE)
            pb_utils.Logger.log_error(f"{BLS_MODEL}: {traceback.format_exc()}")
            return "failed", error(f"internal error in {exc}", pb_utils.TritonError.INTERNAL)
        except Exception as exc:  # a server fault: logged in full, one line to the caller
            pb_utils.Logger.log_error(f"{BLS_MODEL}: {traceback.format_exc()}")
            return "failed", error(f"internal error: {type(exc).__name__} (see the server log)",
                                   pb_utils.TritonError.INTERNAL)

    @staticmethod
    def _stop_check(request):
        """should_stop() for one request: "cancelled" once the client is gone (gRPC cancel or deadline),
        or a timeout message once the request's `timeout` parameter (microseconds, Triton's own, which
        also bounds its wait in the queue) has passed since it started here."""
        started, limit_s = time.monotonic(), request.timeout() / 1e6

        def should_stop():
            if request.is_cancelled():
                return "cancelled"
            if limit_s and time.monotonic() - started > limit_s:
                return f"deadline exceeded: the request's timeout of {limit_s:g} s passed"
            return None

        return should_stop

    def _serve(self, request):
        clock = StageClock()
        with clock("parse"):
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
            parsed = parse({k: v.as_numpy() for k, v in tensors.items() if v is not None}, self.limits)
        generated = self.pipeline(parsed, clock, self._stop_check(request))
        images = generated.images  # [N, H, W, 3] uint8
        # Triton names every declared output for a client that names none; the fallback covers a core
        # that passes none on.
        requested = request.requested_output_names() or DEFAULT_OUTPUTS
        outputs = []
        if "png" in requested:
            with clock("png"):
                outputs.append(pb_utils.Tensor("png", np.array([self.encode_png(image) for image in images],
                                                               dtype=np.object_)))
        if "images" in requested:
            with clock("response"):
                outputs.append(pb_utils.Tensor("images", images))
        if "seed" in requested:
            outputs.append(pb_utils.Tensor("seed", np.array([generated.seed], dtype=np.int64)))
        if "notes" in requested:
            outputs.append(pb_utils.Tensor("notes", np.array([note.encode() for note in generated.notes],
                                                             dtype=np.object_).reshape(-1)))
        self._report_stages(clock)
        return pb_utils.InferenceResponse(outputs)

    def _report_stages(self, clock: StageClock) -> None:
        if self.pipeline.known_reference_hits != self.known_reported:
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
            parameters={INTERNAL_PARAMETER: self.secret} if self.secret else None,  # internal models check it
        )
        response = request.exec()
        if response.has_error():
            error = ComponentError(model, response.error().message())
            if error.dead:
                self.readiness.component_died(model)
            raise error
        self.readiness.call_succeeded()
        results = [to_torch(pb_utils.get_output_tensor_by_name(response, name)) for name in outputs]
        for name, tensor in zip(outputs, results, strict=True):  # None: an output the model left out (a cache miss)
            if tensor is None:
                continue
            self.arrived[tensor.device.type] = self.arrived.get(tensor.device.type, 0) + 1  # reported by execute()
            if tensor.device.type != self.device.type:
                raise RuntimeError(f"{model} returned '{name}' on {tensor.device}, not on the BLS's {self.device}")
        return results

    def _increment(self, family, label: str, value: str, amount: float) -> None:
        """Add `amount` to `family`'s metric for {label: value} (with this model's labels), made on first use."""
        if (label, value) not in self.labelled_metrics:
            self.labelled_metrics[label, value] = lasting(family.Metric(labels={**self.output_labels, label: value}))
        self.labelled_metrics[label, value].increment(amount)


def png_encoder(name: str):
    """image [H, W, 3] uint8 -> PNG bytes. "fpng" (the fpng library: ~15x faster than Pillow at 1024^2,
    files within a few % of Pillow's fastest level; see BENCHMARKS.md), or Pillow at compress level N
    ("pillow:N", Pillow's default is 6). Without fpng installed (it ships x86-64 wheels only),
    Pillow at level 1. Lossless either way: the pixels are the `images` output's."""
    if name == "fpng":
        try:  # optional: x86-64 wheels only
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
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", compress_level=level)
    return buffer.getvalue()
