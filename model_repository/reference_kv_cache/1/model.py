"""reference_kv_cache, internal: the reference K/V cache of the installed flux2_serving package."""

from flux2_serving.models.reference_cache import TritonPythonModel  # noqa: F401 - Triton looks it up here
