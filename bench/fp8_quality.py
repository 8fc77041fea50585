"""FP8 vs fp32: the same requests through the served pipeline (in-process, onnxruntime) on the fp32
graphs and on the FP8 graphs of the same checkpoint (export --quantize fp8), image differences per case.

Both exports of the bench checkpoint (random weights, a 512-wide transformer) are made here when missing;
the FP8 one is calibrated on --calibration-size of the project's prompts at --calibration-side. Mean and
max absolute difference in 8-bit levels and PSNR over every pixel of each case's images, and the
relative L2 difference of one cached transformer step (same inputs). Random weights say little about
real image quality: this measures what FP8 rounding does to this pipeline's numbers, not to pictures a
person would judge; the 9B model's FP8-vs-bf16 figures come from `make gpu-check` on a lent GPU.
"""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from bench.report import benchmark_parser, machine, parse_benchmark_args, publish

# (name, reference sizes, output side): text-to-image, one reference, three references.
CASES = (("text to image", [], 256), ("1 reference", [(256, 256)], 256), ("3 references", [(256, 192), (192, 256),
                                                                                          (224, 224)], 256))
SEEDS = (11, 12, 13)


def export(checkpoint: str, out: Path, quantize: bool, size: int, side: int) -> None:
    if (out / "manifest.json").exists():
        return
    cmd = [sys.executable, "-m", "flux2_serving.export", "--model", checkpoint, "--onnx-dir", str(out)]
    if quantize:
        cmd += ["--quantize", "fp8", "--calibration-size", str(size), "--calibration-side", str(side)]
    print(f"exporting {out} ...", flush=True)
    subprocess.run(cmd, check=True)


def request(prompt: str, references: list, side: int, seed: int) -> dict:
    """The raw inputs of one request as a client sends them (clients.api.request_tensors): random-noise
    references, PNG-encoded."""
    from PIL import Image

    from flux2_serving.clients.api import request_tensors

    images = [Image.fromarray(np.random.default_rng(seed + index).integers(0, 256, (height, width, 3), dtype=np.uint8))
              for index, (width, height) in enumerate(references)]
    return {name: array for name, (array, _) in
            request_tensors(prompt, images, height=side, width=side, seed=seed).items()}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def cached_step_difference(fp32_dir: Path, fp8_dir: Path) -> float:
    """Relative L2 difference of one cached transformer step, FP8 vs fp32, on the same random inputs."""
    import json

    import torch

    from flux2_serving.export.onnx_export import sample_inputs
    from flux2_serving.models.local import onnx_sessions

    dims = json.loads((fp32_dir / "manifest.json").read_text())["dims"]
    names = [i.name for i in onnx_sessions(fp32_dir)("transformer_cached").get_inputs()]
    feeds = {name: value.numpy() for name, value in zip(names, sample_inputs("transformer_cached", dims, torch.float32,
                                                                                {"lat_h": 16, "lat_w": 16}),
                                                         strict=True)}
    fp32, fp8 = (onnx_sessions(d)("transformer_cached").run(None, feeds)[0] for d in (fp32_dir, fp8_dir))
    return float(np.linalg.norm(fp8 - fp32) / np.linalg.norm(fp32))


def served_equals_in_process(fp8_dir: Path, checkpoint: str, pipeline, parse, workdir: Path) -> tuple[int, int]:
    """Each case's first request through a real tritonserver serving the FP8 graphs (onnxruntime runner)
    and through the same graphs in-process: (cases equal bit for bit, cases)."""
    from flux2_serving.clients.api import Flux2Client
    from flux2_serving.server.launch import running
    from flux2_serving.serving.repository import assemble

    repository = assemble(fp8_dir, checkpoint, workdir / "model_repository", backend="onnxruntime", bls_instances=1)
    equal = 0
    with running(repository, log_file=workdir / "server.log") as server, Flux2Client(server.grpc) as client:
        for case, references, side in CASES:
            inputs = request(f"a lighthouse at dawn ({case})", references, side, SEEDS[0])
            served = client.generate(inputs["prompt"][0].decode(), list(inputs.get("image", [])), height=side,
                                     width=side, seed=SEEDS[0])
            served = np.stack([np.asarray(image) for image in served])
            equal += bool(np.array_equal(served, pipeline(parse(inputs, pipeline.limits)).images))
    return equal, len(CASES)


def main(argv=None) -> int:
    parser = benchmark_parser("python -m bench.fp8_quality", __doc__, "checkpoints/bench", "build/onnx/bench-fp32",
                              "python -m flux2_serving.modeling.checkpoint --size bench writes it (make bench does)")
    parser.add_argument("--fp8-onnx-dir", default="build/onnx/bench-fp32-fp8",
                        help="its FP8 export (made here when missing)")
    parser.add_argument("--calibration-size", type=int, default=32, help="prompts the FP8 export calibrates on")
    parser.add_argument("--calibration-side", type=int, default=256, help="image side of the calibration")
    args = parse_benchmark_args(parser, argv)
    from flux2_serving.models.local import local_pipeline  # torch, diffusers, onnxruntime: after --help
    from flux2_serving.models.request_inputs import parse

    fp32_dir, fp8_dir = Path(args.onnx_dir), Path(args.fp8_onnx_dir)
    export(args.checkpoint, fp32_dir, False, 0, 0)
    export(args.checkpoint, fp8_dir, True, args.calibration_size, args.calibration_side)
    pipelines = {name: local_pipeline(d, args.checkpoint)[0] for name, d in (("fp32", fp32_dir), ("fp8", fp8_dir))}
    rows, start = [], time.perf_counter()
    for case, references, side in CASES:
        images = {name: [] for name in pipelines}
        for seed in SEEDS:
            inputs = request(f"a lighthouse at dawn ({case})", references, side, seed)
            for name, pipeline in pipelines.items():
                images[name].append(pipeline(parse(inputs, pipeline.limits)).images.astype(np.float64))
        fp32, fp8 = np.concatenate(images["fp32"]), np.concatenate(images["fp8"])
        diff = np.abs(fp8 - fp32)
        rows.append(f"| {case} | {side}x{side} | {len(SEEDS)} | {diff.mean():.2f} | {diff.max():.0f} | "
                    f"{psnr(fp8, fp32):.1f} |")
        print(rows[-1], flush=True)
    step = cached_step_difference(fp32_dir, fp8_dir)
    from flux2_serving.export.trt_compat import check_graph

    graphs = sorted(fp8_dir.glob("*/model.onnx"))
    compatible = [path.parent.name for path in graphs if check_graph(path).ok]
    equal, cases = served_equals_in_process(fp8_dir, args.checkpoint, pipelines["fp8"], parse,
                                            Path("build/bench/fp8_quality"))
    text = "\n".join([
        "## FP8 vs fp32 on the bench checkpoint (`python -m bench.fp8_quality`)",
        "",
        f"Machine: {machine()}. Command: `{args.command}` ({time.perf_counter() - start:.0f} s for the cases).",
        f"Bench random checkpoint (512-wide transformer), fp32 graphs vs the same graphs with FP8 linear layers "
        f"(`--quantize fp8`, ModelOpt max calibration on {args.calibration_size} of the project's prompts at "
        f"{args.calibration_side}^2; text encoder, prefill and cached step; VAE fp32); the served pipeline in-process "
        "(onnxruntime CPU, which runs the FP8 Q/DQ exactly as the served flavor does), 4 steps, same seeds.",
        "",
        "| case | size | seeds | mean abs diff (levels of 255) | max abs diff | PSNR (dB) |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"One cached transformer step (16x16 latents, same random inputs): relative L2 difference {step:.4f}.",
        f"TensorRT compatibility check (`export.trt_compat`, FP8 Q/DQ rules included): {len(compatible)} of "
        f"{len(graphs)} FP8-export graphs ok.",
        f"Served FP8 (a real tritonserver on the FP8 graphs, onnxruntime runner, gRPC) equals the same graphs "
        f"in-process bit for bit in {equal} of {cases} cases (first seed of each).",
        "",
        "Caveat: random weights say little about real image quality (their activations have no outliers of "
        "trained weights, nor the structure FP8 may blur); this bounds what FP8 rounding does to this pipeline's "
        "numbers. The 9B model's FP8 quality is to be measured on a GPU (`make gpu-check`, FP8 stage) and with real "
        "weights.",
    ])
    publish("fp8-quality", text, not args.no_write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
