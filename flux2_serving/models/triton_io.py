"""Triton Python-backend plumbing shared by every Python model of the repository (the BLS, the
reference cache, the component runners)."""

from __future__ import annotations

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
