"""The served pipeline in-process, without a server: pipeline.py driven by onnxruntime sessions of an
export folder's graphs, the reference K/V cache as the cache model's own LRU. The tests and the FP8
benchmark compare it with the served stack and with diffusers: the same code the BLS runs, minus Triton.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from transformers import AutoTokenizer

from ..contract.envelope import DEFAULT_ENVELOPE
from ..contract.interface import Limits
from ..contract.names import CACHE_MODEL
from .lru import ReferenceKVCache
from .pipeline import ServedPipeline


def onnx_sessions(onnx_dir: str | Path, threads: int = 2):
    """`get(name)` -> an onnxruntime CPU session of `onnx_dir/name/model.onnx`, made once."""
    import onnxruntime as ort  # heavy: only what runs a graph needs it

    sessions = {}

    def get(name: str):
        if name not in sessions:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            sessions[name] = ort.InferenceSession(str(Path(onnx_dir) / name / "model.onnx"), options,
                                                  providers=["CPUExecutionProvider"])
        return sessions[name]

    return get


class OnnxRuntimeRun:
    """`run` of ServedPipeline: each component's graph in onnxruntime, the reference cache an LRU.
    `calls` lists the models asked, in order."""

    def __init__(self, sessions, cache_bytes: int = 2**30):
        self.session, self.cache, self.calls = sessions, ReferenceKVCache(cache_bytes), []

    def __call__(self, model: str, inputs: dict, outputs: list[str]) -> list:
        self.calls.append(model)
        if model == CACHE_MODEL:
            key = inputs["key"][0].decode()
            if "ref_kv_00" in inputs:
                self.cache.put(key, [v for k, v in inputs.items() if k.startswith("ref_kv_")])
                return [np.array([False])]
            found = self.cache.get(key)
            return [np.array([found is not None])] + (found if found is not None else [None] * (len(outputs) - 1))
        feeds = {name: value.numpy() if isinstance(value, torch.Tensor) else value for name, value in inputs.items()}
        results = self.session(model).run(outputs, feeds)
        return [torch.from_numpy(result) for result in results]


def local_pipeline(onnx_dir: str | Path, checkpoint: str, envelope=DEFAULT_ENVELOPE, cache_entries: int = 64,
                   sessions=None) -> tuple[ServedPipeline, OnnxRuntimeRun]:
    """The served pipeline over the fp32 graphs of `onnx_dir` (tokenizer and scheduler from `checkpoint`)."""
    manifest = json.loads((Path(onnx_dir) / "manifest.json").read_text())
    run = OnnxRuntimeRun(sessions or onnx_sessions(onnx_dir))
    pipeline = ServedPipeline(run, AutoTokenizer.from_pretrained(checkpoint, subfolder="tokenizer"),
                              FlowMatchEulerDiscreteScheduler.load_config(checkpoint, subfolder="scheduler"),
                              manifest["dims"], torch.float32, Limits(**envelope.request_limits()), torch.device("cpu"),
                              envelope.text_len, "in-process", cache_entries=cache_entries)
    return pipeline, run
