"""FP8 (E4M3) graphs of the text encoder and the transformer with NVIDIA Model Optimizer.

`quantize_pipeline` calibrates the diffusers modules in place: ModelOpt's `mtq.quantize` puts a
per-tensor FP8 quantizer on the input and the weight of every `nn.Linear` and sets their ranges
("max" calibration, ModelOpt's FP8 default) while the real `Flux2KleinKVPipeline` runs a prompt set
this project writes (`calibration_prompts`) with synthetic references (`calibration_references`):
the text encoder first, on the prompts alone, then the transformer, on whole generations (reference
prefill and cached steps, through the quantized text encoder as served). The layers NVIDIA's FLUX
recipes keep in high precision stay unquantized (contract/fp8_recipe.py); the VAE is not quantized.

`translation_table` tells `torch.onnx.export(dynamo=True)` how to write ModelOpt's fake-quant op
(`tensorrt::quantize_op`) in ONNX: QuantizeLinear -> DequantizeLinear with a FLOAT8E4M3FN zero
point (opset 19), scale = amax / 448, the Q/DQ form TensorRT turns into FP8 GEMMs.
`store_fp8_weights` then replaces each weight's QuantizeLinear by the FP8 weight itself (1 byte per
parameter in the graph; TensorRT reads FP8 initializer -> DequantizeLinear as an FP8 weight).

Why calibrate instead of taking the scales of Black Forest Labs' own FP8 checkpoint
(`FLUX.2-klein-9b-kv-fp8`): that file is the transformer only, in BFL's single-file layout, while the
48 GB and 32 GB tiers also need an FP8 text encoder; it could not be downloaded or inspected here
(whether it carries activation scales for every linear layer is unverified); and the graphs split
the transformer into a prefill and a cached step whose inputs calibration sees as served.
"""

from __future__ import annotations

import io

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image

from flux2_serving.contract.fp8_recipe import TEXT_ENCODER_KEEP, TRANSFORMER_KEEP, kept
from flux2_serving.devtools.pictures import synthetic_reference

FP8_OPSET = 19  # QuantizeLinear / DequantizeLinear take FLOAT8E4M3FN from opset 19 (TensorRT 10: 9-20)
E4M3_MAX = 448.0


# Recipe sizes: ModelOpt's diffusers example calibrates FLUX on 128 prompts (--calib-size 128); klein
# is distilled for 4 steps, its pipeline's default, so calibration runs 4 steps per prompt.
DEFAULT_CALIBRATION_SIZE = 128
DEFAULT_CALIBRATION_SIDE = 1024

# The project's own calibration prompts: subjects x scenes x styles (8 x 4 x 4 = 128), in order, so a
# smaller --calibration-size still mixes subjects, scenes and styles.
_SUBJECTS = ("a red fox", "an old lighthouse", "a bowl of ramen", "a vintage bicycle", "a glass teapot",
             "a snow leopard", "a city street at night", "a child's wooden toy train")
_SCENES = ("on a foggy morning", "under warm studio light", "in a field of wildflowers", "beside a rainy window")
_STYLES = ("photograph, 50mm lens", "watercolor painting", "3D render, soft shadows", "ink sketch with a few colors")


def calibration_prompts(count: int) -> list[str]:
    """`count` prompts (at most 128), cycling the styles fastest, then the scenes, then the subjects."""
    prompts = [f"{subject} {scene}, {style}" for subject in _SUBJECTS for scene in _SCENES for style in _STYLES]
    if not 1 <= count <= len(prompts):
        raise ValueError(f"calibration size {count}: between 1 and {len(prompts)}")
    stride = 37  # coprime with 128: consecutive samples differ in subject, scene and style
    return [prompts[(i * stride) % len(prompts)] for i in range(count)]


def calibration_references(index: int, side: int) -> list:
    """Synthetic references of sample `index`: none, one or two (t2i and edits, as served), the project's
    deterministic pictures (devtools.pictures) with a hue of their own, `side` x `side` and half that wide."""
    sizes = [(side, side), (max(64, side // 2), side)][: index % 3]  # diffusers: sides >= 64
    return [Image.open(io.BytesIO(synthetic_reference(size, hue=(37 * index + 101 * n) % 256)))
            for n, size in enumerate(sizes)]


def fp8_config() -> dict:
    """ModelOpt's per-tensor FP8 (E4M3) config for linear inputs and weights, "max" calibration."""
    fp8 = {"num_bits": (4, 3), "axis": None}
    return {"quant_cfg": [{"quantizer_name": "*", "enable": False},
                          {"quantizer_name": "*weight_quantizer", "cfg": fp8},
                          {"quantizer_name": "*input_quantizer", "cfg": fp8}],
            "algorithm": "max"}


def quantize_pipeline(pipe, size: int = DEFAULT_CALIBRATION_SIZE, side: int = DEFAULT_CALIBRATION_SIDE,
                      steps: int = 4, device: str = "cpu", log=print) -> dict:
    """Calibrate `pipe.text_encoder` and `pipe.transformer` for FP8 in place, running on `device` (the 9B
    model at the recipe's size needs a GPU), and leave the pipeline on the CPU for the export; returns how
    many linear layers of each are quantized (the kept ones disabled)."""
    import modelopt.torch.quantization as mtq  # heavy, and only the FP8 export needs it
    import torch

    prompts = calibration_prompts(size)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # one line per calibration generation instead

    def encode(_module):
        with torch.no_grad():
            for prompt in prompts:
                pipe.encode_prompt(prompt)

    def generate(_module):
        with torch.no_grad():
            for index, prompt in enumerate(prompts):
                log(f"  calibration {index + 1}/{len(prompts)}: {index % 3} reference(s), {side}x{side}, "
                    f"{steps} steps", flush=True)
                pipe(prompt=prompt, image=calibration_references(index, side) or None, height=side, width=side,
                     num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(index),
                     output_type="latent")

    counts = {}
    for name, module, loop, keep in (("text_encoder", pipe.text_encoder, encode, TEXT_ENCODER_KEEP),
                                     ("transformer", pipe.transformer, generate, TRANSFORMER_KEEP)):
        log(f"calibrating the {name} for FP8 on {len(prompts)} prompt(s) ...", flush=True)
        mtq.quantize(module, fp8_config(), forward_loop=loop)
        mtq.disable_quantizer(module, lambda quantizer, keep=keep: kept(quantizer, keep))
        counts[name] = quantized_linears(module)
    pipe.to("cpu")
    return counts


def quantized_linears(module) -> int:
    """How many linear layers of `module` have an enabled FP8 weight quantizer."""
    return sum(1 for _, sub in module.named_modules()
               if getattr(getattr(sub, "weight_quantizer", None), "is_enabled", False))


def export_mode():
    """The context ModelOpt's quantizers must be traced in (their ranges become graph constants)."""
    from modelopt.torch.quantization.utils import export_torch_mode

    return export_torch_mode()


def translation_table() -> dict:
    """`custom_translation_table` of torch.onnx.export: ModelOpt's fake quant -> ONNX FP8 Q/DQ."""
    import ml_dtypes
    import onnx_ir as ir
    import torch
    from onnxscript import opset19 as op

    def fp8_qdq(x, amax, num_bits: int, exponent_bits: int, unsigned: bool, narrow_range: bool):
        # ModelOpt calls this op only for FP8 here (num_bits 8, exponent_bits 4: E4M3).
        scale = op.CastLike(op.Div(op.Cast(amax, to=onnx.TensorProto.FLOAT), op.Constant(value_float=E4M3_MAX)), x)
        zero = op.Constant(value=ir.tensor(np.zeros((), dtype=ml_dtypes.float8_e4m3fn)))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zero), scale)

    return {torch.ops.tensorrt.quantize_op.default: fp8_qdq}


def store_fp8_weights(proto: onnx.ModelProto) -> int:
    """Replace each QuantizeLinear of a constant weight by its FP8 result as an initializer, so the graph
    holds FP8 weights (what its DequantizeLinear computes is unchanged: the same saturating
    round-to-nearest-even division as QuantizeLinear). Returns how many weights were stored."""
    import ml_dtypes

    graph = proto.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    stored, kept_nodes = {}, []
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and all(name in initializers for name in node.input[:3]):
            weight, scale = (numpy_helper.to_array(initializers[name]) for name in node.input[:2])
            ratio = weight.astype(np.float32) / scale.astype(np.float32)
            fp8 = np.clip(ratio, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)
            stored[node.output[0]] = numpy_helper.from_array(fp8, f"{node.input[0]}.fp8")  # named after the weight
            continue
        kept_nodes.append(node)
    if not stored:
        return 0
    for node in kept_nodes:  # the DequantizeLinears read the FP8 weight instead of the QuantizeLinear
        for index, name in enumerate(node.input):
            if name in stored:
                node.input[index] = stored[name].name
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(stored.values())
    used = {name for node in graph.node for name in node.input}
    unused = [tensor for tensor in graph.initializer if tensor.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return len(stored)


def fp8_counts(proto: onnx.ModelProto) -> dict:
    """How many FP8 Q/DQ nodes and FP8 initializers a graph holds (the export's report, the tests)."""
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    return {"QuantizeLinear": sum(n.op_type == "QuantizeLinear" for n in proto.graph.node),
            "DequantizeLinear": sum(n.op_type == "DequantizeLinear" for n in proto.graph.node),
            "fp8_weights": sum(t.data_type == fp8 and len(t.dims) > 0 for t in proto.graph.initializer)}
