"""One record per exported graph: what each component is and needs, in one place. The I/O spec
(specs.graph_specs, which depends on the model's dims), the profiles (envelope.profile_ranges) and the
export, the engine builder, the memory plan and the Triton configs read these fields instead of
testing graph names. Standard library only."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Graph:
    name: str
    module: str  # the checkpoint module it wraps: "text_encoder", "vae" or "transformer"
    wrapper: str  # its torch wrapper: a class of flux2_serving.modeling.components, exported as is
    # Largest batch its engine runs. The text encoder batches requests (Triton's dynamic batcher): 512
    # tokens per prompt leave its GEMMs short. The cached step runs up to 2 images of one request at a
    # time (the BLS splits larger requests): at 1024^2 a sample is 4096 + 512 tokens, already
    # compute-bound, and each extra sample costs ~1 GiB of activations at 1440^2. The VAE decoder
    # decodes one image per call: its activations at 1440^2 are ~1.6 GiB per image.
    engine_batch: int
    # Fewest references it takes (None: it takes none): a prefill has at least one reference, the cached
    # step runs text-to-image with none.
    min_references: int | None = None
    # Its image profiles are bounded by the reference area, as two boxes (envelope.profile_ranges).
    area_bounded: bool = False
    # Its attention (one head, 512 wide, which TensorRT's fused kernels do not promise to cover) is
    # exported in query slices (export.components.query_chunked_attention).
    sliced_attention: bool = False


GRAPHS = {graph.name: graph for graph in (
    Graph("text_encoder", "text_encoder", "TextEncoder", engine_batch=4),
    Graph("vae_encoder", "vae", "VaeEncoder", engine_batch=1, area_bounded=True, sliced_attention=True),
    Graph("transformer_prefill", "transformer", "TransformerPrefill", engine_batch=1, min_references=1),
    Graph("transformer_cached", "transformer", "TransformerCached", engine_batch=2, min_references=0),
    Graph("vae_decoder", "vae", "VaeDecoder", engine_batch=1, sliced_attention=True),
)}
COMPONENTS = tuple(GRAPHS)  # the exported graphs, in pipeline order
