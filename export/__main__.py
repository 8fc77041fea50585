"""python -m flux2_serving.export: diffusers checkpoint -> one ONNX graph per FLUX.2 [klein] KV component."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.contract.cli_help import prog as cli_prog
from flux2_serving.contract.graphs import COMPONENTS
from flux2_serving.contract.manifest import Manifest
from flux2_serving.contract.manifest import write as write_manifest
from flux2_serving.contract.tiers import FP8_ENGINES
from flux2_serving.export.quiet import quiet_frameworks

DESCRIPTION = """\
Export FLUX.2 [klein] KV (diffusers Flux2KleinKVPipeline layout) to ONNX: one graph per
component, written to OUT/<component>/model.onnx, plus OUT/manifest.json describing them.

  text_encoder         Qwen3 truncated after layer 27 -> prompt_embeds (hidden states 9/18/27)
  vae_encoder          image -> packed, batch-norm-normalised reference tokens
  transformer_prefill  reference tokens + positions -> K/V of every block (reference prefill)
  transformer_cached   one denoising step given reference K/V (N_ref = 0: text-to-image)
  vae_decoder          packed latents -> image

Every graph is checked against TensorRT's ONNX parser support list after export.

Quiet by default: the frameworks' warnings (torch.onnx, onnxscript's constant folding, transformers,
diffusers: none of them a fault of the export) and their weight-loading progress bars are off;
--verbose shows them. Errors always show, and download progress bars stay.
"""

EPILOG = """\
examples:
  python -m flux2_serving.modeling.checkpoint --out checkpoints/tiny
  python -m flux2_serving.export --model checkpoints/tiny --onnx-dir build/onnx/fp32
  python -m flux2_serving.export --model black-forest-labs/FLUX.2-klein-9b-kv --onnx-dir build/onnx/bf16 --dtype bf16
  python -m flux2_serving.export --model checkpoints/tiny --onnx-dir build/onnx/fp32-fp8 --quantize fp8 \\
      --calibration-size 4 --calibration-side 64
  python -m flux2_serving.export --model black-forest-labs/FLUX.2-klein-9b-kv --onnx-dir build/onnx/bf16-fp8 \\
      --dtype bf16 --quantize fp8 --calibration-device cuda
"""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog=cli_prog("flux2_serving.export"), description=DESCRIPTION, epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", required=True,
                        help="Hugging Face id or local directory of a Flux2KleinKVPipeline checkpoint")
    parser.add_argument("--onnx-dir", "--out", dest="out", required=True,
                        help="folder to write the graphs and manifest.json to (e.g. build/onnx/fp32)")
    parser.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="weight and activation dtype of the graphs (default fp32; bf16 for production "
                             "engines: TensorRT's strongly typed networks take precision from the ONNX types)")
    parser.add_argument("--quantize", choices=("fp8",), default=None,
                        help="fp8: the text encoder's and the transformer's linear layers in FP8 (E4M3 Q/DQ, "
                             "opset 19), calibrated with NVIDIA Model Optimizer on the project's prompt set "
                             "(export/fp8.py); the VAE and the layers NVIDIA's FLUX recipe keeps stay in --dtype")
    parser.add_argument("--calibration-size", type=int, default=None, metavar="N",
                        help="--quantize: prompts to calibrate on (default 128, ModelOpt's FLUX recipe; 1-128)")
    parser.add_argument("--calibration-side", type=int, default=None, metavar="PX",
                        help="--quantize: image side of the calibration generations (default 1024)")
    parser.add_argument("--calibration-steps", type=int, default=None, metavar="N",
                        help="--quantize: denoising steps per calibration prompt (default 4, klein's)")
    parser.add_argument("--calibration-device", default=None, metavar="DEV",
                        help="--quantize: where the calibration runs (default cpu; cuda for the 9B model)")
    parser.add_argument("--components", nargs="+", choices=COMPONENTS, default=list(COMPONENTS),
                        metavar="NAME", help=f"subset to export (default: all of {', '.join(COMPONENTS)})")
    parser.add_argument("--skip-check", action="store_true", help="skip the TensorRT compatibility check")
    parser.add_argument("--verbose", action="store_true",
                        help="show the frameworks' warnings and progress bars (torch.onnx, onnxscript, transformers, "
                             "diffusers)")
    parser.add_argument("--manifest-only", action="store_true",
                        help="write OUT/manifest.json without exporting any graph: all that the torch serving "
                             "flavor (python -m flux2_serving.serving.repository --backend torch) needs")
    args = parser.parse_args(argv)
    problem = checkpoint_problem(args.model)
    if problem:
        print(f"error: --model {args.model}: {problem}", file=sys.stderr)
        return 2
    if not args.verbose:
        quiet_frameworks()

    # torch, diffusers and transformers (through .loading, .onnx_export and .trt_compat's onnx) are
    # imported after the options are read and the frameworks quieted: --help answers without them.
    from flux2_serving.modeling.loading import read_model_dims

    out = Path(args.out)
    start = time.perf_counter()
    dims = read_model_dims(args.model)
    if args.manifest_only:
        out.mkdir(parents=True, exist_ok=True)
        paths = {name: out / name / "model.onnx" for name in args.components}  # where an export would put them
        opset = None
    else:
        from flux2_serving.export.fp8 import FP8_OPSET
        from flux2_serving.export.onnx_export import OPSET, export_all

        print(f"exporting {len(args.components)} component(s) of {args.model} ({args.dtype}) to {out}", flush=True)
        calibration = {key: value for key, value in (("size", args.calibration_size), ("side", args.calibration_side),
                                                     ("steps", args.calibration_steps),
                                                     ("device", args.calibration_device)) if value is not None}
        paths = export_all(args.model, out, args.dtype, args.components, verbose=args.verbose,
                           quantize=args.quantize, calibration=calibration)
        opset = FP8_OPSET if args.quantize else OPSET
    write_manifest(out, Manifest(
        # The model the graphs came from: the repository assembler takes its tokenizer and scheduler.
        model=str(Path(args.model).resolve()) if Path(args.model).is_dir() else args.model,
        dtype=args.dtype, opset=opset, dims=dims,  # opset None: no graph exported (--manifest-only)
        paths={name: str(paths[name].relative_to(out)) for name in paths}, quantization=args.quantize,
        quantized=tuple(name for name in paths if args.quantize and name in FP8_ENGINES)))

    failed = 0
    if not args.skip_check and not args.manifest_only:
        from flux2_serving.export.trt_compat import check_graph, summary

        for name, path in paths.items():
            report = check_graph(path)
            print(summary(name, report), flush=True)  # the parser's rules, not a TensorRT run
            failed += not report.ok
    print(f"done in {time.perf_counter() - start:.0f} s: {out / 'manifest.json'}")
    return 1 if failed else 0


def checkpoint_problem(model: str) -> str | None:
    """What is wrong with a --model value, in one line (None: nothing we can tell before loading)."""
    if model.startswith("random:"):
        return None if model in ("random:9b", "random:tiny") else "random weights are random:9b or random:tiny"
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "model_index.json").exists():
            return ("not a diffusers checkpoint folder (no model_index.json in it); `make checkpoint` writes the "
                    "tiny one, or give a Hugging Face id such as black-forest-labs/FLUX.2-klein-9b-kv")
        return None
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        return ("no such folder (a local checkpoint folder, or a Hugging Face id such as "
                "black-forest-labs/FLUX.2-klein-9b-kv)")
    return None


if __name__ == "__main__":
    sys.exit(main())
