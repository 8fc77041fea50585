"""Triton Python-backend plumbing shared by every Python model of the repository (the BLS, the
reference cache, the component runners)."""

from __future__ import annotations

import ctypes
import gc
import json

import numpy as np
import triton_python_backend_utils as pb_utils


def model_config(args) -> tuple[dict, dict]:
    """(config.pbtxt as a dict, its parameters as {key: string value})."""
    config = json.loads(args["model_config"])
    return config, {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def request_parameters(request) -> dict:
    """A request's parameters as a dict; {} for anything else, so no caller can make this raise."""
    try:
        parameters = json.loads(request.parameters() or "{}")
    except ValueError:
        return {}
    return parameters if isinstance(parameters, dict) else {}


def to_torch(tensor, device=None):
    """A Triton tensor as a torch tensor (None stays None): numpy for CPU tensors, DLPack for GPU
    ones and for bf16, which numpy cannot hold; moved to `device` if given."""
    import torch  # heavy: the onnxruntime component runner imports this module and never needs it

    if tensor is None:
        return None
    value = None
    if tensor.is_cpu():
        try:
            value = torch.from_numpy(tensor.as_numpy())
        except Exception:  # e.g. bf16, which has no numpy type: go through DLPack
            pass
    if value is None:
        value = torch.utils.dlpack.from_dlpack(tensor.to_dlpack())
    return value if device is None else value.to(device)


def to_triton(name: str, value):
    """A numpy array or torch tensor as a Triton tensor. GPU and bf16 tensors go as DLPack producers
    (the tensor itself, not a capsule): the Python backend calls __dlpack__(stream=...) and
    synchronises, so no request reads a GPU buffer that a kernel is still writing."""
    import torch  # heavy: as in to_torch, not needed by the onnxruntime component runner

    if isinstance(value, np.ndarray):
        return pb_utils.Tensor(name, value)
    value = value.contiguous()
    if value.device.type == "cpu" and value.dtype != torch.bfloat16:
        return pb_utils.Tensor(name, value.numpy())
    return pb_utils.Tensor.from_dlpack(name, value)


# The Python-backend process's teardown (issue 28), python_backend r24.10 / Triton core r24.10 (tritonserver 2.51).
# The stub frees what a model still holds only after it has let go of its shared memory: main() calls
# stub.reset(), which empties the static Stub before ~Stub sets model_instance_ to None (src/pb_stub.cc:2184,
# :1037), and Python's own teardown (Py_Finalize, pb_stub.cc:2111's scoped_interpreter) comes later still. A
# Triton object freed then crashes the process: a MetricFamily or Metric gets a fresh Stub from
# Stub::GetOrCreateInstance() with no shared-memory pool and dereferences it (src/metric_family.cc:58-59,
# src/metric.cc:254-255: "segfault at 60 ... in triton_python_backend_stub"); a request (~InferRequest ->
# PbCancel) frees its shared-memory message through the deleted pool's mutex ("general protection fault ...
# in libc.so.6", in pthread_mutex_lock).
#
# Freeing a metric earlier, in finalize() while the stub is whole, is no better: tritonserver then deletes
# it, and Triton core counts a series' users per MetricFamily object (core src/metric_family.cc:122-159)
# while every instance of a model, and the next version a reload brings, shares one Prometheus series
# (same name and labels): the first instance to go removes the series for all, and the others go on
# writing to the freed counter (measured: flux2_bls_requests_total vanished from /metrics after a reload).
# So metric objects are never freed (lasting()), and finalize() ends with before_teardown().
_LASTING: list = []


def lasting(metric_object):
    """`metric_object` (a pb_utils.MetricFamily or Metric), never freed: one reference more than anything
    will drop, Python's teardown included (a module's globals are cleared then). Its series stays on the
    metrics endpoint, shared with the model's other instances, and tritonserver keeps a few bytes per
    instance per load."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(metric_object))
    _LASTING.append(metric_object)  # for the reader (and a debugger): what is held
    return metric_object


def before_teardown() -> None:
    """The end of a model's finalize(), after it has dropped what it holds: collects reference cycles, so
    that none holding a Triton object is left for the stub's teardown, then freezes what is left
    (gc.freeze), so that Python's teardown collects nothing after the stub has gone (and takes half as
    long: ~1.2 s instead of ~2.8 s for a BLS instance here). Only for a stub's finalize(): it is the last
    Python code of that process."""
    gc.collect()
    gc.freeze()
