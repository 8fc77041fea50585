"""OUT/manifest.json of an export, read and written here only (standard library: the engine
builder reads it inside NVIDIA's TensorRT container).

It records what the graphs are: the source model (a local folder, resolved, or a hub id; the
repository assembler takes the tokenizer and scheduler from it), the dtype, the ONNX opset (None
for --manifest-only), the quantization (FP8) and which graphs have it, the model dims and each
graph's path and declared I/O spec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .specs import GraphSpec, graph_specs, spec_from_manifest

FILE = "manifest.json"
# ENGINES/build_record.json: what each built engine needs (written by export.build_engines, read by the
# memory plan).
BUILD_RECORD = "build_record.json"


class MissingManifest(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Manifest:
    model: str
    dtype: str
    opset: int | None
    dims: dict
    paths: dict  # graph name -> path of its model.onnx, relative to the export folder
    # None, or "fp8": the linear layers of the graphs in quantized (FP8 Q/DQ, export/fp8.py)
    quantization: str | None = None
    quantized: tuple = ()

    @property
    def specs(self) -> dict[str, GraphSpec]:
        return {name: spec for name, spec in graph_specs(self.dims).items() if name in self.paths}

    def to_json(self) -> dict:
        specs = graph_specs(self.dims)
        return {"model": self.model, "dtype": self.dtype, "opset": self.opset, "dims": self.dims,
                "quantization": self.quantization, "quantized": list(self.quantized),
                "graphs": {name: {"path": path, **asdict(specs[name])} for name, path in self.paths.items()}}


def write(folder, manifest: Manifest) -> Path:
    path = Path(folder) / FILE
    path.write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return path


def read(folder) -> Manifest:
    path = Path(folder) / FILE
    if not path.exists():
        raise MissingManifest(f"{path} not found: export the graphs first "
                              f"(python -m flux2_serving.export --model MODEL --onnx-dir {folder})")
    data = json.loads(path.read_text())
    manifest = Manifest(data["model"], data["dtype"], data.get("opset"), data["dims"],
                        {name: entry["path"] for name, entry in data["graphs"].items()},
                        data.get("quantization"), tuple(data.get("quantized", ())))
    for name, entry in data["graphs"].items():  # a manifest written by older code must still say the same
        if spec_from_manifest(name, entry) != graph_specs(manifest.dims)[name]:
            raise ValueError(f"{path}: the I/O spec of {name} differs from this code's: re-export the graphs")
    return manifest
