"""Triton Python-backend model that serves one exported ONNX graph with onnxruntime (CPU).

Not a model on its own: `python -m export.repository --backend onnxruntime` copies this file
into each component's version folder next to its `model.onnx` and writes the component's
config.pbtxt from the declared I/O spec. Production serves the same graphs as TensorRT plans.
"""

import json
import os

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

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            try:
                results = self.session.run(self.outputs, feeds)
            except Exception as exc:  # onnxruntime rejects shapes outside what the graph takes
                responses.append(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}", pb_utils.TritonError.INVALID_ARG)))
                continue
            responses.append(pb_utils.InferenceResponse(
                [pb_utils.Tensor(name, value) for name, value in zip(self.outputs, results)]))
        return responses
