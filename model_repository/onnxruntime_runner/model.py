"""Triton Python-backend model that serves one exported ONNX graph with onnxruntime (CPU).

Not a model on its own: `python -m export.repository --backend onnxruntime` copies this file
into each component's version folder next to its `model.onnx` and writes the component's
config.pbtxt from the declared I/O spec. Production serves the same graphs as TensorRT plans.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(params.get("intra_op_threads", "0"))
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.inputs = [tensor["name"] for tensor in config["input"]]
        self.outputs = [tensor["name"] for tensor in config["output"]]
        self.batching = config.get("max_batch_size", 0) > 0

    def execute(self, requests):
        """With dynamic batching Triton hands over several requests at once: requests of equal
        shapes (apart from the batch axis) run as one batch, as a TensorRT engine would run them."""
        feeds = [{name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
                 for request in requests]
        groups = {}
        for index, feed in enumerate(feeds):
            key = tuple(feed[name].shape[1:] for name in self.inputs) if self.batching else index
            groups.setdefault(key, []).append(index)
        responses = [None] * len(requests)
        for members in groups.values():
            batch = {name: np.concatenate([feeds[i][name] for i in members]) for name in self.inputs}
            try:
                results = self.session.run(self.outputs, batch)
            except Exception as exc:  # onnxruntime rejects shapes outside what the graph takes
                error = pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INVALID_ARG)
                for i in members:
                    responses[i] = pb_utils.InferenceResponse(error=error)
                continue
            start = 0
            for i in members:
                size = len(feeds[i][self.inputs[0]]) if self.batching else None  # None: whole outputs
                stop = None if size is None else start + size
                responses[i] = pb_utils.InferenceResponse(
                    [pb_utils.Tensor(name, value[start:stop]) for name, value in zip(self.outputs, results)])
                start = stop
        return responses
