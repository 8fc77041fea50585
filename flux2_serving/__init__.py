"""FLUX.2 [klein] 9B-KV served by Triton with TensorRT engines.

Layers, each importing only the ones before it:

  contract   standard library only: the serving envelope, the graphs' I/O specs, the public
             interface and its limits, model and tensor names, the export manifest, the reference
             key, the security settings, the CLI help format, the serving processes' malloc
             thresholds. Clients need nothing else.
  modeling   what the exporter and the server both build from a checkpoint: loaders, one torch wrapper
             per graph, the latent layout, random weights (torch, diffusers)
  export     checkpoint -> ONNX graphs, FP8, TensorRT engines, checks; the top-level export/ folder
             (pyproject.toml's package-dir)
  models     the Triton Python-backend models (BLS, component runner, reference K/V cache); the
             model folders of model_repository/ import them by name
  serving    assembles a model repository: config.pbtxt files, graphs or plans, tokenizer; the GPU
             memory plan
  server     starts, guards, repairs and fronts tritonserver (launch, serve, supervisor, watchdog, gateway)
  clients    the Python client, its CLI and the demo; the top-level clients/ folder
  devtools   support for tests, benchmarks and load tests (not needed to serve)
  front      the OpenAI Images API (generations, edits) as an ASGI service that forwards to Triton over
             gRPC; it holds no model, so it scales apart from the GPU replicas
"""

from pathlib import Path

# The source checkout this package sits in (an editable install): where build/ outputs and the deploy/
# templates are. A wheel install has no checkout; only the development tools use this.
CHECKOUT = Path(__file__).resolve().parent.parent
