"""flux2_klein_kv, the public model: the BLS of the installed flux2_serving package."""

from flux2_serving.models.bls import TritonPythonModel  # noqa: F401 - Triton looks it up here
