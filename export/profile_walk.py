"""python -m flux2_serving.export.profile_walk ONNX_DIR: every intermediate tensor of every exported graph at its
TensorRT profile's maximum shapes, without TensorRT or running anything.

onnxruntime's symbolic shape inference carries the envelope's max input shapes (envelope.engine_profiles: each profile)
through each graph; the report gives each graph's largest tensor and its largest attention-score
tensor (a Softmax's input or output, the MatMul or Cast that feeds it, the Cast after it). TensorRT
supports tensors over 2^31 - 1 elements only partly (NVIDIA/TensorRT issue 3815), so a graph fails when
one of its tensors is larger, except the attention scores of the transformer and text encoder graphs:
those the memory plan assumes TensorRT fuses into one attention kernel (no score tensor at all), which
`make engine-check` reports per engine on the GPU host. The VAE's attention (one head, 512 wide) is not
assumed fused: its graphs run it in query slices (components.query_chunked_attention) and must fit.
The element counts are those of the exported model (the tiny one here: fewer heads and channels than
klein 9B; the memory plan states the 9B figures).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE, engine_profiles
from flux2_serving.contract.manifest import read

LIMIT = 2**31 - 1
ASSUMED_FUSED = ("text_encoder", "transformer_prefill", "transformer_cached")  # multi-head attention, head 128
PASS_THROUGH = ("Cast", "Mul", "Div", "Add", "Where")  # between a score MatMul and its Softmax


@dataclass
class Walk:
    graph: str
    largest_other: tuple[int, str]  # (elements, tensor) over every tensor but the attention scores
    largest_score: tuple[int, str]  # (elements, tensor) over attention scores; (0, "") without attention
    unresolved: list[str]  # tensors whose shape stayed symbolic
    profile: int = 0  # which of the engine's TensorRT profiles (envelope.profile_ranges)

    @property
    def largest(self) -> tuple[int, str]:
        return max(self.largest_other, self.largest_score)

    @property
    def fused_assumed(self) -> bool:
        return self.graph in ASSUMED_FUSED

    @property
    def over_limit(self) -> list[tuple[int, str]]:
        """Tensors over 2^31 - 1 elements that nothing excuses (empty: the graph fits)."""
        checked = [self.largest_other] + ([] if self.fused_assumed else [self.largest_score])
        return [item for item in checked if item[0] > LIMIT]


def score_tensors(graph) -> set[str]:
    """Attention-score tensors: each Softmax's input and output, back through casts, scaling and masking
    to the MatMul that made them, forward through casts and torch's NaN guard to the MatMul that uses them."""
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    scores = set()
    for node in graph.node:
        if node.op_type != "Softmax":
            continue
        name = node.input[0]
        while name:
            scores.add(name)
            source = producer.get(name)
            name = source.input[0] if source is not None and source.op_type in PASS_THROUGH else None
        todo = [node.output[0]]  # forward: casts, and torch's NaN guard (IsNaN -> Where) before the MatMul
        while todo:
            name = todo.pop()
            scores.add(name)
            todo += [n.output[0] for n in consumers.get(name, []) if n.op_type in ("Cast", "IsNaN", "Where")
                     and n.output[0] not in scores]
    return scores


def walk(onnx_path, input_shapes: dict[str, tuple]) -> Walk:
    """Shapes of every tensor of the graph at `input_shapes` ({input: shape}); the largest ones."""
    proto = onnx.load(str(onnx_path), load_external_data=False)
    for value in proto.graph.input:
        for dim, size in zip(value.type.tensor_type.shape.dim, input_shapes[value.name], strict=True):
            dim.ClearField("dim_param")
            dim.dim_value = size
    inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
    scores = score_tensors(inferred.graph)
    sizes, unresolved = [], []
    for value in (*inferred.graph.value_info, *inferred.graph.output):
        dims = value.type.tensor_type.shape.dim
        if not all(d.HasField("dim_value") for d in dims):
            unresolved.append(value.name)
            continue
        sizes.append((math.prod(d.dim_value for d in dims), value.name))
    others = [item for item in sizes if item[1] not in scores]
    attention = [item for item in sizes if item[1] in scores]
    return Walk(Path(onnx_path).parent.name, max(others, default=(0, "")), max(attention, default=(0, "")),
                unresolved)


def walk_export(onnx_dir) -> list[Walk]:
    """Every graph of an export at each of its profiles' maximum shapes."""
    manifest = read(onnx_dir)
    walks = []
    for name, spec in manifest.specs.items():
        for index, profile in enumerate(engine_profiles(spec, DEFAULT_ENVELOPE)):
            shapes = {tensor: hi for tensor, (_, _, hi) in profile.items()}
            walks.append(walk(Path(onnx_dir) / manifest.paths[name], shapes))
            walks[-1].profile = index
    return walks


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.export.profile_walk", __doc__)
    parser.add_argument("onnx_dir", help="an export (has manifest.json)")
    args = parser.parse_args(argv)
    failed = False
    print(f"{'graph (profile)':<24} {'largest other tensor':>21} {'largest attention scores':>25}  verdict")
    for w in walk_export(args.onnx_dir):
        verdict = "ok" if not w.over_limit and not w.unresolved else "OVER 2^31-1" if w.over_limit else "unresolved"
        if w.fused_assumed and w.largest_score[0] > LIMIT:
            verdict += " (attention fused: assumed)"
        failed |= bool(w.over_limit or w.unresolved)
        print(f"{f'{w.graph} ({w.profile})':<24} {w.largest_other[0]:>21,} {w.largest_score[0]:>25,}  {verdict}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
