"""text_encoder on the Python backend (onnxruntime or torch; a TensorRT repository serves its plan instead, or
runs it here with weight streaming, runtime tensorrt_streamed): the component runner of the installed
flux2_serving package."""

from flux2_serving.models.component_runner import TritonPythonModel  # noqa: F401 - Triton looks it up here
