"""Triton Python-backend model that serves one FLUX.2 [klein] KV component, in place of its
TensorRT engine. The parameter `runtime` picks how:

* `onnxruntime`: the exported ONNX graph (`model.onnx` next to this file) on the CPU, since
  Triton's onnxruntime backend is not available on the development machines;
* `torch`: the very wrapper module the graph is exported from (flux2_serving.modeling.components),
  loaded from the checkpoint the export recorded, in the export dtype on the parameter `device`.
  It serves on a GPU before any engine is built (a 9B build takes long) and is the baseline the
  engines are checked against. For an FP8 export's components (parameter quantize=fp8) its linear
  layers are FP8 (models/fp8_linear.py: torch._scaled_mm on FP8 GPUs, with per-call input scales);
* `tensorrt_streamed`: the TensorRT engine (`model.plan` next to this file) with its weights streamed
  from host memory, keeping `stream_budget_bytes` of them on the GPU (trt_runtime.TensorRTStreamed):
  the engines a memory tier streams (contract/tiers.py), since Triton's tensorrt_backend has no
  weight-streaming setting. Written to TensorRT 10's documented API, not run yet.

Each component's committed model folder (model_repository/<component>/1/model.py) imports this
class; `python -m flux2_serving.serving.repository --backend onnxruntime|torch` writes its
config.pbtxt from the declared I/O spec, the same as the TensorRT engine's (`--backend tensorrt
--tier T` writes it, with the runtime `tensorrt_streamed`, for the engines tier T streams). With
dynamic batching Triton hands over several requests at once: requests of equal shapes (apart from
the batch axis) run as one batch, as an engine would.

Internal, as reference_kv_cache: every request must carry the server's internal secret as the
request parameter `flux2_internal` (contract/security.py; the BLS sends it), else it is refused
before its inputs are read. Without a secret in the environment (tritonserver started by hand, not
by flux2_serving.server.launch or serve) the model does not load: it could answer nobody. A TensorRT
engine served by Triton's tensorrt_backend cannot check a parameter (docs/security.md).

One caller's error is that caller's alone: every request is checked on its own first
(input_checks.py: the envelope's shapes, token ids within the vocabulary) and a bad one answers
INVALID_ARG without joining a batch; should a batch still fail, its requests run one by one, so
only the culprit fails. Every error response gets its own TritonError (one object attached to
several responses crashed tritonserver 2.51) and one line of message, never a traceback; refusals
are not logged (a caller must not be able to fill the server's log).
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from ..contract.heap import keep_freed_memory
from ..contract.security import INTERNAL_ONLY, INTERNAL_SECRET_ENV, internal_secret, is_internal
from .input_checks import BadInput, InputRules
from .triton_io import model_config, request_parameters, to_torch, to_triton
from .trt_runtime import TensorRTStreamed  # light: it imports tensorrt and torch only when instantiated


class OnnxRuntime:
    """The exported graph in onnxruntime (CPU); numpy in and out."""

    def __init__(self, args, params, output_names):
        import onnxruntime as ort  # heavy: only this runtime needs it (the torch runtime runs without it)

        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.output_names = output_names

    @staticmethod
    def read(tensor):
        return tensor.as_numpy()

    @staticmethod
    def concat(values):
        return np.concatenate(values)

    def __call__(self, inputs: dict) -> list:
        return self.session.run(self.output_names, inputs)

    @staticmethod
    def write(name, value):
        return pb_utils.Tensor(name, value)


class Torch:
    """The wrapper module in PyTorch on `device`; tensors stay there (DLPack in and out)."""

    def __init__(self, args, params, output_names):
        # torch, diffusers (export.components, export.loading): heavy, only this runtime needs them
        import torch

        from ..modeling.components import build
        from ..modeling.loading import DTYPES

        self.torch = torch
        self.device = torch.device(params.get("device", "cpu"))
        name, dtype = args["model_name"], DTYPES[params["dtype"]]
        if params.get("quantize") == "fp8":  # an FP8 export's component: FP8 linear layers in PyTorch
            from .fp8_linear import fp8_wrapper

            self.module = fp8_wrapper(name, params["checkpoint"], self.device, dtype)
        else:
            self.module = build(name, params["checkpoint"], dtype, self.device)

    def read(self, tensor):
        return to_torch(tensor, self.device)

    def concat(self, values):
        return self.torch.cat(values)

    def __call__(self, inputs: dict) -> list:
        with self.torch.inference_mode():
            outputs = self.module(*inputs.values())
        return [outputs] if isinstance(outputs, self.torch.Tensor) else list(outputs)

    @staticmethod
    def write(name, value):
        return to_triton(name, value)


RUNTIMES = {"onnxruntime": OnnxRuntime, "torch": Torch, "tensorrt_streamed": TensorRTStreamed}


class TritonPythonModel:
    def initialize(self, args):
        config, params = model_config(args)
        keep_freed_memory()  # MiB-sized tensors every request: no page faults for each (contract/heap.py)
        self.name = args["model_name"]
        self.secret = internal_secret()
        if self.secret is None:  # refusing every request would hide the cause: fail the load, saying why
            raise RuntimeError(f"{self.name}: no internal secret in the environment ({INTERNAL_SECRET_ENV}); this "
                               "model answers only requests carrying it: start tritonserver with "
                               "python -m flux2_serving.server.launch or flux2_serving.server.serve")
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.batching = config.get("max_batch_size", 0) > 0
        self.rules = InputRules.from_json(params["input_rules"])
        self.runtime = RUNTIMES[params.get("runtime", "onnxruntime")](args, params, self.outputs)

    def error(self, message: str):
        """A response with a new TritonError of its own (INVALID_ARG, one line)."""
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {message}",
                                                                     pb_utils.TritonError.INVALID_ARG))

    def execute(self, requests):
        rt = self.runtime
        responses = [None] * len(requests)
        feeds = {}
        for index, request in enumerate(requests):  # each request checked alone, before any batch is stacked
            if not is_internal(request_parameters(request), self.secret):
                responses[index] = self.error(INTERNAL_ONLY)
                continue
            try:
                feed = {name: rt.read(pb_utils.get_input_tensor_by_name(request, name)) for name in self.inputs}
                self.rules.check(feed)
                feeds[index] = feed
            except BadInput as exc:
                responses[index] = self.error(str(exc))
            except Exception as exc:  # unreadable input: this request's error only
                responses[index] = self.error(f"unreadable input ({type(exc).__name__})")
        groups = {}
        for index, feed in feeds.items():
            key = tuple(tuple(feed[name].shape[1:]) for name in self.inputs) if self.batching else index
            groups.setdefault(key, []).append(index)
        for members in groups.values():
            self._run(members, feeds, responses)
        return responses

    def _run(self, members: list, feeds: dict, responses: list) -> None:
        """Run `members` as one batch; if that fails, each alone, so only a failing request fails."""
        rt = self.runtime
        batch = {name: rt.concat([feeds[i][name] for i in members]) if len(members) > 1 else feeds[members[0]][name]
                 for name in self.inputs}
        try:
            results = rt(batch)
        except Exception as exc:  # e.g. shapes the graph does not take, as an engine rejects them
            if len(members) > 1:
                for index in members:
                    self._run([index], feeds, responses)
                return
            message = " ".join(str(exc).split())[:300]
            responses[members[0]] = self.error(f"the graph refused this input ({type(exc).__name__}: {message})")
            return
        start = 0
        for index in members:
            size = len(feeds[index][self.inputs[0]]) if self.batching else None  # None: whole outputs
            stop = None if size is None else start + size
            responses[index] = pb_utils.InferenceResponse(
                [rt.write(name, value[start:stop]) for name, value in zip(self.outputs, results, strict=True)])
            start = stop
