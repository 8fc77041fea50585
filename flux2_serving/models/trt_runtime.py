"""The component runner's `tensorrt_streamed` runtime: a TensorRT engine whose weights stream from host
memory, for the memory tiers that list it in `streamed` (contract/tiers.py: 32gb-fp8 streams the text
encoder and the prefill, which run once per request, keeping `stream_budget_gib` of each on the GPU).

Triton's tensorrt_backend has no weight-streaming setting (docs: ../shared/DESIGN.md section 8), so a
repository assembled with `--backend tensorrt` and such a tier serves these engines from the Python
backend's component runner (component_runner.py, parameter `runtime: tensorrt_streamed`) with this class,
and the others from tensorrt_backend as usual.

WRITTEN TO THE DOCUMENTED API, NOT RUN: TensorRT is not installable on the development machines and they
have no GPU. The class follows TensorRT 10's Python API (the 10.x bindings' docstrings,
NVIDIA/TensorRT python/docstrings/infer/pyCoreDoc.h, and the "Weight Streaming" page of the TensorRT
developer guide): the plan is built with BuilderFlag.WEIGHT_STREAMING on a strongly typed network
(flux2_serving.export.build_engines --tier), `engine.weight_streaming_budget_v2` is set after
deserializing and before the execution context exists (a budget of streamable_weights_size or more
disables streaming; 0 streams the most), and inference is set_input_shape / set_tensor_address /
execute_async_v3 on a CUDA stream. What runs here: the pure helpers below (dtype names, profile
choice, budget check) and the one-line error without TensorRT (tests/test_weight_streaming.py).

Cost: the streamed weights cross PCIe on every execution (once per request for these two engines), and
TensorRT holds the whole engine's weights in host memory after deserialization.
"""

from __future__ import annotations

import os

MISSING_TENSORRT = "the tensorrt_streamed runtime needs the tensorrt Python package (NVIDIA's TensorRT container)"

# TensorRT DataType member name -> torch dtype name, for the engine's inputs and outputs. FP8 (and INT4,
# FP4) occur inside the FP8 engines only; their I/O stays bf16 / int64 in every tier (contract/tiers.py).
TORCH_DTYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64", "BOOL": "bool", "UINT8": "uint8"}


def torch_dtype_name(trt_dtype) -> str:
    """The torch dtype name ("bfloat16", ...) of a tensorrt.DataType (or its member name, "BF16")."""
    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
    if name not in TORCH_DTYPES:
        raise ValueError(f"TensorRT data type {name} is not an input or output type this runtime handles "
                         f"(it handles {', '.join(TORCH_DTYPES)})")
    return TORCH_DTYPES[name]


def check_budget(component: str, budget: int, streamable: int) -> int:
    """The weight-streaming budget to set, or ValueError (one line) when the engine cannot honour it:
    built without weight streaming (streamable_weights_size 0), or a budget above its streamable weights
    (the memory plan would count a budget the engine does not use), or a negative one."""
    budget, streamable = int(budget), int(streamable)
    if streamable <= 0:
        raise ValueError(f"{component}: the engine was not built for weight streaming (streamable_weights_size 0); "
                         "rebuild it with python -m flux2_serving.export.build_engines --tier TIER, a tier that "
                         "streams it")
    if budget < 0:
        raise ValueError(f"{component}: stream_budget_bytes must be >= 0, got {budget}")
    if budget > streamable:
        raise ValueError(f"{component}: stream_budget_bytes {budget} exceeds the engine's streamable weights "
                         f"({streamable} bytes): nothing would stream; lower the budget or serve the engine "
                         "from tensorrt_backend")
    return budget


def _fits(shape: tuple, low: tuple, high: tuple) -> bool:
    if not len(shape) == len(low) == len(high):
        return False
    return all(lo <= size <= hi for size, lo, hi in zip(shape, low, high, strict=True))


def select_profile(shapes: dict, profiles: list, component: str = "engine") -> int:
    """Index of the first optimization profile whose [min, max] holds every input shape.

    `shapes`: {input name: shape}; `profiles`: one {input name: (min shape, max shape)} per profile, in
    profile order (TensorRT's get_tensor_profile_shape gives min, opt, max). ValueError naming the input,
    its shape and the profile's range when none does."""
    if not profiles:
        raise ValueError(f"{component}: the engine has no optimization profile")
    reasons = []
    for index, profile in enumerate(profiles):
        for name, shape in shapes.items():
            low, high = profile[name]
            if not _fits(tuple(shape), tuple(low), tuple(high)):
                reasons.append(f"input '{name}' has shape {list(shape)}, outside optimization profile {index} "
                               f"(min {list(low)}, max {list(high)})")
                break
        else:
            return index
    raise ValueError(f"{component}: " + "; ".join(reasons))


class TensorRTStreamed:
    """`model.plan` next to the model in TensorRT with weight streaming, on the parameter `device` (a
    CUDA device); torch CUDA tensors in and out. Parameters: `stream_budget_bytes` (bytes of streamable
    weights kept on the GPU). Written to the documented API, not run (module docstring)."""

    def __init__(self, args, params, output_names):
        try:
            import tensorrt as trt  # NVIDIA's containers only: the other runtimes run without it
        except ImportError as exc:
            raise RuntimeError(f"{MISSING_TENSORRT}: {exc}") from None
        import torch

        from .triton_io import to_torch, to_triton  # needs the Python backend's triton_python_backend_utils

        self.torch, self._to_torch, self._to_triton = torch, to_torch, to_triton
        self.name = args["model_name"]
        self.output_names = list(output_names)
        self.device = torch.device(params.get("device", "cuda:0"))
        if self.device.type != "cuda":
            raise ValueError(f"{self.name}: the tensorrt_streamed runtime runs on a CUDA device, not {self.device}")
        torch.cuda.set_device(self.device)
        path = os.path.join(args["model_repository"], args["model_version"], "model.plan")
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)  # kept: it must outlive the engine
        with open(path, "rb") as f:
            plan = f.read()
        engine = self.runtime.deserialize_cuda_engine(plan)
        del plan  # TensorRT keeps its own host copy of the streamable weights
        if engine is None:
            raise RuntimeError(f"{self.name}: TensorRT {trt.__version__} could not deserialize {path} (built by "
                               "another TensorRT version or for another GPU?)")
        # The budget must be set before an execution context exists.
        budget = check_budget(self.name, int(params["stream_budget_bytes"]), int(engine.streamable_weights_size))
        engine.weight_streaming_budget_v2 = budget
        if int(engine.weight_streaming_budget_v2) != budget:
            raise RuntimeError(f"{self.name}: TensorRT did not take the weight-streaming budget {budget} (it reports "
                               f"{engine.weight_streaming_budget_v2})")
        self.engine = engine
        self.context = engine.create_execution_context()
        if self.context is None:
            raise RuntimeError(f"{self.name}: TensorRT could not create an execution context (GPU memory: "
                               f"{engine.weight_streaming_scratch_memory_size} bytes of streaming scratch)")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(outputs) != sorted(self.output_names):
            raise RuntimeError(f"{self.name}: the engine's outputs {outputs} are not the config's {self.output_names}")
        self.dtypes = {n: getattr(torch, torch_dtype_name(engine.get_tensor_dtype(n))) for n in names}
        self.profiles = []
        for index in range(engine.num_optimization_profiles):
            ranges = {}
            for name in self.input_names:
                low, _, high = engine.get_tensor_profile_shape(name, index)
                ranges[name] = (tuple(low), tuple(high))
            self.profiles.append(ranges)
        # TensorRT's execute_async_v3 docstring advises against the default stream (extra device syncs).
        self.stream = torch.cuda.Stream(self.device)

    def read(self, tensor):
        return self._to_torch(tensor, self.device)

    def concat(self, values):
        return self.torch.cat(values)

    def __call__(self, inputs: dict) -> list:
        torch, context = self.torch, self.context
        missing = [name for name in self.input_names if name not in inputs]
        if missing:
            raise ValueError(f"{self.name}: no value for the engine inputs {missing}")
        shapes = {name: tuple(inputs[name].shape) for name in self.input_names}
        profile = select_profile(shapes, self.profiles, self.name)
        # Buffers are made on the caller's (current) torch stream, which reads the outputs afterwards; TensorRT
        # runs on a stream of its own (its execute_async_v3 docstring advises against the default stream)
        # that first waits for the caller's work.
        feeds = {}  # alive until the engine has finished with them
        for name in self.input_names:
            value = inputs[name]
            if value.dtype != self.dtypes[name]:
                raise ValueError(f"{self.name}: input '{name}' is {value.dtype}; the engine takes {self.dtypes[name]}")
            feeds[name] = value.to(self.device).contiguous()
        handle = self.stream.cuda_stream
        if profile != context.active_optimization_profile and not context.set_optimization_profile_async(
                profile, handle):
            raise RuntimeError(f"{self.name}: TensorRT refused optimization profile {profile}")
        for name, value in feeds.items():
            if not context.set_input_shape(name, shapes[name]):
                raise ValueError(f"{self.name}: TensorRT refused shape {list(shapes[name])} for input '{name}'")
            context.set_tensor_address(name, value.data_ptr())
        results = []
        for name in self.output_names:  # output shapes are known once every input shape is set
            shape = tuple(context.get_tensor_shape(name))
            if any(size < 0 for size in shape):
                raise RuntimeError(f"{self.name}: TensorRT could not infer the shape of output '{name}' ({shape})")
            value = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            context.set_tensor_address(name, value.data_ptr())
            results.append(value)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        if not context.execute_async_v3(handle):
            raise RuntimeError(f"{self.name}: TensorRT execute_async_v3 failed (see the server log)")
        self.stream.synchronize()
        del feeds
        return results

    def write(self, name, value):
        return self._to_triton(name, value)
