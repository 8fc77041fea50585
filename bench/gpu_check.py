"""python -m bench.gpu_check (make gpu-check): the one prepared check for a machine with a GPU.

Made for the GPU machines the team borrows: about 15 minutes each, start-up included, PyTorch + CUDA only. The
whole run, the bundle's venv included, fits --budget-s (480 s by default); `--plan` prints each stage's time box
with the estimate it comes from. Stages run in the order of their value, each in its own process under its own
box, each writing what it measured the moment it has it (OUT/stage_X.json; a box that runs out keeps its
partial figures), and the report goes to OUT/report.md, and with --benchmarks on a GPU also to the GPU section
of BENCHMARKS.md (a CPU run never rewrites it); a failed stage is reported in one line and the next one runs:

  a environment   GPU, memory, driver, torch and CUDA versions; whether tritonserver and the
                  Python-backend stub of this Python load here (the stub needs libpython3.X.so)
  d served        the headline: the served stack with random weights built on the device (klein 9B dims on a
                  GPU, tiny dims on the CPU; nothing downloaded), text-to-image and 1 reference at 1024x1024
                  (256x256 on the CPU), 4 steps, against Flux2KleinKVPipeline and the non-KV Flux2KleinPipeline
                  on the same weights in the same run; time outside the component models; peak memory
  b served_tiny   the served stack at the tiny size in the torch flavor, BLS on the device (bf16 on a
                  GPU, fp32 on the CPU): text-to-image, 1 and 3 references, 2 images per prompt, each
                  against Flux2KleinKVPipeline on the same device; a reference-cache hit equals the
                  miss; every component output arrived on the device (the BLS's metric)
  f fp8           FP8 against bf16 (flux2_serving.models.fp8_linear): the cached transformer step at klein 9B
                  dims, random weights, 1 reference and a 1024x1024 output, in bf16, then with its linear
                  layers swapped to FP8 in place (torch._scaled_mm on a GPU of compute capability >= 8.9):
                  step time, peak memory, the difference of the step output, of the latents after 4 steps
                  and of their decoded image (random-weight VAE of the same dims). On the CPU: a rehearsal
                  at the tiny dims, on the FP8 layer's fallback path (same code otherwise)
  c probe_9b      bench.gpu_probe: the transformer steps at 9B (GPU only)
  e export        not in the default run (--stages ...e): bf16 ONNX export of transformer_cached at those dims
                  (time, peak host RAM, size) and the TensorRT compatibility check. At 9B it builds the
                  transformer on the CPU and writes ~18 GB: it cannot fit the budget; at the tiny size (CPU) it
                  takes seconds

On a machine with only PyTorch and no network: `python -m bench.gpu_bundle` (where packages
install) writes build/gpu_bundle (tritonserver and the missing packages, < 60 MiB); this script
then builds build/gpu_venv from it and re-runs itself there.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import resource
import site
import statistics
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

from bench.report import tree_memory_gib, write_section
from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.specs import graph_specs
from flux2_serving.devtools.metrics import bls_output_devices, reference_cache_metrics
from flux2_serving.modeling.checkpoint import random_module, write_checkpoint
from flux2_serving.server.launch import LaunchError, bundled_server, prepare_backends, running, server_env

# Imports inside the functions below are of packages this machine may lack until the bundle's venv is entered
# (numpy, Pillow, torch, diffusers, transformers, tritonclient, onnx, and the project modules that import them):
# each stage imports its own, so a missing one fails only that stage, and --help needs none.

ROOT = Path(__file__).resolve().parents[1]
# In the order they run: the served 9B latency first, then the rest by value (issue 29). e only when asked.
STAGES = {"a": "environment", "d": "served", "b": "served_tiny", "f": "fp8", "c": "probe_9b", "e": "export"}
DEFAULT_STAGES = "adbfc"
# Where each stage's time goes on an H100 (ESTIMATES, seconds: arithmetic and guesses, no GPU run yet; `--plan`
# prints them). Its box is the sum times MARGIN; the boxes of the stages run share the budget left after the
# machine-side set-up in proportion to them, so they never add up to more than the budget.
SETUP = [("bundle venv: unpack site.tar.xz (~60 MiB) and tritonserver.tar.xz, re-exec", 20),
         ("this process: start, torch import, CUDA init", 10)]
ESTIMATES = {
    "a": [("torch import and CUDA init", 8), ("nvidia-smi, ldd of tritonserver and the stub", 4),
          ("imports of numpy, diffusers, transformers, tritonclient", 8)],
    "d": [("imports: torch, diffusers, transformers, tritonclient", 15),
          ("tritonserver and 7 Python-backend stubs start; text encoder (8.2 B), prefill (7.2 B) and cached step "
           "(9.1 B parameters) built from random bf16 weights on the GPU", 90),
          ("served: 2 cases x (1 warm-up + 2 timed) requests x ~2 s (9B, 4 steps, 1024^2)", 12),
          ("the same random weights rebuilt in this process for diffusers", 20),
          ("Flux2KleinKVPipeline: 2 cases x (1 + 2) x ~1.5 s", 9),
          ("Flux2KleinPipeline (no KV): 2 cases x (1 + 2) x ~2 s", 12)],
    "b": [("imports", 10), ("tritonserver and 7 stubs start, tiny modules on the GPU", 25),
          ("4 cases served and in diffusers, a cache hit", 15)],
    "f": [("imports", 10), ("a 9B transformer built on the GPU in bf16", 12),
          ("2 x (1 warm-up + 5) cached steps at 1024^2 with 1 reference, ~0.3 s each", 4),
          ("2 x 4 steps and 2 decodes with a random 9B-dims VAE", 11)],
    "c": [("imports and a 9B transformer on the GPU", 20), ("bench.gpu_probe's step timings", 20)],
    "e": [("a 9B transformer built on the CPU in bf16", 60),
          ("the dynamo exporter at 9B dims (~150 s on 2 cores with meta weights; more with real ones)", 240),
          ("~18 GB written", 60), ("the TensorRT compatibility check", 30)],
}
MARGIN = 1.4
GPU_BUDGET_S = 480.0  # 8 of the GPU machine's 15 minutes: its start-up and a rerun fit the rest
CPU_BUDGET_S = 1200.0  # the CPU rehearsal (tiny dims, 2 cores): the same boxes, scaled to this
BOX_S = {letter: math.ceil(sum(s for _, s in items) * MARGIN) for letter, items in ESTIMATES.items()}
SETUP_S = math.ceil(sum(s for _, s in SETUP) * MARGIN)
# The CPU rehearsal's boxes: the same, but e exports the tiny transformer (seconds), not the 9B one.
CPU_BOX_S = {**BOX_S, "e": 120}
GPU_ONLY = {"c"}
GIB = 2**30


# ---------------------------------------------------------------------------------- preparation


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def ready_here() -> list[str]:
    """What this Python lacks for the check (empty: ready)."""
    missing = [m for m in ("torch", "diffusers", "transformers", "tritonclient", "PIL") if not _have(m)]
    try:
        import numpy  # may be missing or 2.x: that is what this function reports

        if int(numpy.__version__.split(".")[0]) >= 2:
            missing.append("numpy<2")
    except ImportError:
        missing.append("numpy")
    if not (_have("pytriton") or os.environ.get("FLUX2_TRITONSERVER_DIR")):
        missing.append("tritonserver")
    return missing


# What an editable install of this checkout puts in site-packages (the GPU machine installs nothing): the
# checkout on the path (flux2_serving, bench), and a finder for pyproject.toml's package-dir, which maps the
# top-level export/ and clients/ folders to flux2_serving.export and flux2_serving.clients.
CHECKOUT_FINDER = """import sys
from importlib.machinery import PathFinder

ROOT = {root!r}
FOLDERS = {folders!r}


class CheckoutFolders:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        return PathFinder.find_spec(fullname, [ROOT]) if fullname in FOLDERS else None


sys.meta_path.append(CheckoutFolders)
"""


def link_checkout(purelib: Path) -> None:
    """Make this checkout importable from the venv whose site-packages is `purelib`, as `pip install -e` would."""
    folders = sorted(f"flux2_serving.{name}" for name in ("export", "clients"))
    (purelib / "flux2_serving_checkout.py").write_text(CHECKOUT_FINDER.format(root=str(ROOT), folders=folders))
    (purelib / "flux2_serving_checkout.pth").write_text(f"{ROOT}\nimport flux2_serving_checkout\n")


def enter_bundle_venv(bundle: Path, argv: list[str]) -> None:
    """Build build/gpu_venv from the bundle and re-run there. The venv sees this interpreter's packages
    (torch with CUDA) through a .pth file, behind its own (numpy < 2 wins over a numpy 2.x here), and this
    checkout's flux2_serving through another."""
    venv = ROOT / "build" / "gpu_venv"
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        with tarfile.open(bundle / "site.tar.xz") as tar:
            tar.extractall(purelib)
        paths = sysconfig.get_paths()
        here = dict.fromkeys([*site.getsitepackages(), paths["purelib"], paths["platlib"]])
        Path(purelib, "flux2_host_packages.pth").write_text(
            "".join(f"{path}\n" for path in here if Path(path).is_dir()))
        link_checkout(Path(purelib))
        with tarfile.open(bundle / "tritonserver.tar.xz") as tar:
            tar.extractall(venv / "triton")
    env = {**os.environ, "FLUX2_GPU_VENV": "1",
           "FLUX2_TRITONSERVER_DIR": str(venv / "triton" / "pytriton" / "tritonserver")}
    print(f"gpu_check: using {venv} (from {bundle})", flush=True)
    os.execve(str(python), [str(python), "-m", "bench.gpu_check", *argv], env)


# ---------------------------------------------------------------------------------- helpers


def _log(message: str) -> None:
    print(f"[gpu_check {time.strftime('%H:%M:%S')}] {message}", flush=True)


def _device_memory_sampler(device: str):
    """Peak memory in use while a stage runs: GPU (nvidia-smi, whole card) or the process tree (CPU)."""
    state = {"peak_gib": 0.0, "stop": False}

    def used_gib() -> float:
        if device.startswith("cuda"):
            index = device.split(":")[1] if ":" in device else "0"
            query = ["nvidia-smi", f"--id={index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            out = subprocess.run(query, capture_output=True, text=True, check=False).stdout.strip()
            return float(out) / 1024 if out else 0.0
        return tree_memory_gib(os.getpid())["rss_gib"]

    def loop():
        while not state["stop"]:
            state["peak_gib"] = max(state["peak_gib"], used_gib())
            time.sleep(0.5)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()

    def stop() -> float:
        state["stop"] = True
        thread.join(2)
        return round(state["peak_gib"], 2)

    return stop


def _dtype_name(device: str) -> str:
    return "bf16" if device.startswith("cuda") else "fp32"


def _tiny_checkpoint(out: Path) -> Path:
    path = out / "tiny"
    if not (path / "model_index.json").exists():
        write_checkpoint(path, seed=0)
    return path


def _manifest(model: str, out: Path, dtype: str) -> Path:
    folder = out / f"manifest_{model.replace(':', '_').replace('/', '_')}_{dtype}"
    if not (folder / "manifest.json").exists():
        from flux2_serving.export.__main__ import main as export_main

        assert export_main(["--model", model, "--out", str(folder), "--dtype", dtype, "--manifest-only"]) == 0
    return folder


@contextlib.contextmanager
def torch_server(manifest_dir: Path, checkpoint: Path, out: Path, device: str, name: str):
    """A torch-flavor repository on `device`, served by a real tritonserver on free loopback ports
    (flux2_serving.server.launch.Running), stopped on the way out."""
    from flux2_serving.serving.repository import assemble  # needs tritonclient: only the serving stages import it

    repository = assemble(manifest_dir, str(checkpoint), out / f"repo_{name}", backend="torch", device=device,
                          bls_instances=1, envelope=replace(DEFAULT_ENVELOPE, reference_cache_bytes=8 * GIB))
    # No gate: the GPU bundle carries no aiohttp, and this server answers only this check's own requests.
    with running(repository, log_file=out / f"server_{name}.log", gate=False) as server:
        yield server


def _compare(served, expected, dtype: str) -> dict:
    import numpy as np  # may be missing outside the bundle's venv: only the stages that compare need it

    diff = np.abs(served.astype(np.int16) - expected.astype(np.int16))
    result = {"shape": list(served.shape), "max_diff": int(diff.max()), "mean_diff": round(float(diff.mean()), 3),
              "within_1": round(float((diff <= 1).mean()), 5), "within_8": round(float((diff <= 8).mean()), 5)}
    if dtype == "fp32":  # as the test suite: the same arithmetic, up to float32 rounding
        result["ok"] = result["within_1"] >= 0.999 and result["max_diff"] <= 4
    else:  # bf16 keeps 8 significant bits and the KV split reorders the references' arithmetic
        result["ok"] = result["mean_diff"] <= 2.0 and result["within_8"] >= 0.95
    return result


def _pipelines(checkpoint, device: str, dtype, modules=None):
    """Flux2KleinKVPipeline and the non-KV Flux2KleinPipeline (distilled: no CFG) on the same modules."""
    # diffusers, transformers: heavy, may be missing; only the stages that run diffusers import them
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinKVPipeline, Flux2KleinPipeline
    from transformers import AutoTokenizer

    if modules is None:
        kv = Flux2KleinKVPipeline.from_pretrained(checkpoint, dtype=dtype).to(device)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(checkpoint, subfolder="scheduler")
        kv = Flux2KleinKVPipeline(scheduler=scheduler,
                                  tokenizer=AutoTokenizer.from_pretrained(checkpoint, subfolder="tokenizer"), **modules)
    parts = {k: getattr(kv, k) for k in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")}
    plain = Flux2KleinPipeline(**parts, is_distilled=True)
    for pipe in (kv, plain):
        pipe.set_progress_bar_config(disable=True)
    return kv, plain


def _pipeline_images(pipe, device: str, prompt, refs, seed, **kwargs):
    # numpy, torch: may be missing outside the bundle's venv; only the stages that run diffusers need them
    import numpy as np
    import torch

    extra = {"guidance_scale": 1.0} if type(pipe).__name__ == "Flux2KleinPipeline" else {}
    out = pipe(prompt=prompt, image=list(refs) or None, generator=torch.Generator(device).manual_seed(seed),
               output_type="np", **extra, **kwargs).images
    return (out * 255).round().astype(np.uint8)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch  # heavy, may be missing: only the stages that time on a GPU need it

        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------- stages


def stage_limit(letter: str, budget_s: float, stages: str = DEFAULT_STAGES, boxes: dict = BOX_S) -> float:
    """Stage `letter`'s time box: its box's share of `budget_s` among the stages run (sums to `budget_s`)."""
    return budget_s * boxes[letter] / sum(boxes[s] for s in stages)


def plan(budget_s: float, stages: str = DEFAULT_STAGES) -> tuple[str, bool]:
    """The time plan `--plan` prints: every estimate with its arithmetic, the boxes, and whether the set-up and the
    boxes fit `budget_s` (the boxes actually given are the estimated ones scaled to the budget left)."""
    lines = [f"gpu_check plan: budget {budget_s:.0f} s, set-up included; box = estimate x {MARGIN} (margin)", "",
             f"set-up: {' + '.join(str(s) for _, s in SETUP)} = {sum(s for _, s in SETUP)} s "
             f"-> {SETUP_S} s"]
    lines += [f"    {s:>4} s  {what}" for what, s in SETUP]
    for letter in stages:
        items = ESTIMATES[letter]
        total = sum(s for _, s in items)
        lines.append(f"{letter} {STAGES[letter]}: {' + '.join(str(s) for _, s in items)} = {total} s -> box "
                     f"{BOX_S[letter]} s, given {stage_limit(letter, budget_s - SETUP_S, stages):.0f} s")
        lines += [f"    {s:>4} s  {what}" for what, s in items]
    needed = SETUP_S + sum(BOX_S[s] for s in stages)
    fits = needed <= budget_s
    lines += ["", f"total: set-up {SETUP_S} s + boxes {' + '.join(str(BOX_S[s]) for s in stages)} = {needed} s "
                  f"{'<=' if fits else '>'} {budget_s:.0f} s: {'fits' if fits else 'DOES NOT FIT'}"]
    if "e" not in stages:
        lines.append(f"not in this run: e export (box {BOX_S['e']} s: a 9B transformer on the CPU and ~18 GB "
                     "written do not fit; --stages ...e asks for it)")
    return "\n".join(lines), fits


def stage_environment(args) -> dict:
    import torch  # heavy, may be missing: a missing torch fails this stage only

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cuda_available": torch.cuda.is_available(), "device": args.device}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / GIB, 1),
                    compute_capability=f"{props.major}.{props.minor}")
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False)
        info["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "?"
    for module in ("numpy", "diffusers", "transformers", "tritonclient"):
        try:
            info[module] = __import__(module).__version__
        except Exception as exc:  # any failure to import is reported, not raised
            info[module] = f"missing ({type(exc).__name__})"
    server = bundled_server()
    backends = ROOT / "build" / "tritonserver" / "backends"
    stub = backends / "python" / "triton_python_backend_stub"
    libdir = sysconfig.get_config_var("LIBDIR")
    problems = {}
    binary = server / "bin" / "tritonserver"
    ldd = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, env=server_env(), check=False).stdout
    lost = [line.split()[0] for line in ldd.splitlines() if "not found" in line] if binary.exists() else ["the binary"]
    if lost:
        problems["tritonserver"] = ", ".join(lost)
    try:  # the very stub flux2_serving.server.launch will use, checked as the launcher checks it
        prepare_backends(backends)
    except LaunchError as exc:
        problems["stub"] = str(exc)
    info.update(tritonserver=str(server), stub=str(stub), libpython_dir=libdir, unresolved=problems)
    info["ok"] = not problems
    if problems:
        info["error"] = "; ".join(f"{name}: {what}" for name, what in problems.items())
    return info


CASES = {  # name: (references as (width, height), request arguments)
    "text_to_image": ([], dict(height=256, width=256)),
    "one_reference": ([(320, 256)], {}),
    "three_references": ([(96, 128), (200, 72), (160, 160)], dict(height=256, width=288)),
    "two_images_per_prompt": ([(128, 96)], dict(height=256, width=256, num_images_per_prompt=2)),
}


def stage_served_tiny(args) -> dict:
    # numpy, torch, Pillow, the client (tritonclient) and export.loading (torch): may be missing, fail this stage only
    import numpy as np
    import torch
    from PIL import Image

    from flux2_serving.clients.api import Flux2Client
    from flux2_serving.modeling.loading import DTYPES

    out, device, dtype = args.out, args.device, _dtype_name(args.device)
    checkpoint = _tiny_checkpoint(out)
    result = {"dtype": dtype, "cases": {}}
    with torch_server(_manifest(str(checkpoint), out, dtype), checkpoint, out, device, "tiny") as server:
        kv, _ = _pipelines(str(checkpoint), device, DTYPES[dtype])
        rng = np.random.default_rng(0)
        with Flux2Client(server.grpc) as client:
            for name, (sizes, kwargs) in CASES.items():
                refs = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
                prompt, seed = f"a watercolor fox ({name})", 1234
                served = np.stack([np.asarray(i) for i in client.generate(prompt, refs, seed=seed, **kwargs)])
                expected = _pipeline_images(kv, device, prompt, refs, seed, **kwargs)  # diffusers' names both ways
                result["cases"][name] = _compare(served, expected, dtype)
            # A cache hit gives the miss's image: the same 1-reference request twice.
            ref = [Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8))]
            before = reference_cache_metrics(server.metrics).get("hits_total", 0)
            miss, hit = (np.asarray(client.generate("cache check", ref, seed=5, height=256, width=256)[0])
                         for _ in range(2))
            hits = reference_cache_metrics(server.metrics).get("hits_total", 0) - before
        result["cache_hit_equals_miss"] = bool(np.array_equal(miss, hit)) and hits == 1
        devices = bls_output_devices(server.metrics)
        result["bls_output_devices"] = devices
        result["outputs_stay_on_device"] = set(devices) == {torch.device(device).type}
    failed = [n for n, c in result["cases"].items() if not c["ok"]]
    failed += [k for k in ("cache_hit_equals_miss", "outputs_stay_on_device") if not result[k]]
    result["ok"] = not failed
    if failed:
        result["error"] = "failed: " + ", ".join(failed)
    result["tolerance"] = ("fp32: >= 99.9% of values within 1 level, none over 4 (as the tests)" if dtype == "fp32" else
                           "bf16: mean |diff| <= 2 levels and >= 95% within 8: bf16 keeps 8 significant bits and the "
                           "KV split computes the references' K/V in a separate forward, so rounding differs; a layout "
                           "or device bug moves values by tens of levels")
    return result


def stage_probe(args, limit_s: float) -> dict:
    path = args.out / "probe.json"
    cmd = [sys.executable, "-m", "bench.gpu_probe", "--json", str(path), "--budget-s", str(max(30, limit_s - 30))]
    run = subprocess.run(cmd, capture_output=True, text=True, check=False)
    result = json.loads(path.read_text()) if path.exists() else {}
    result["ok"] = run.returncode == 0 and bool(result)
    if not result["ok"]:
        result["error"] = (run.stderr.strip().splitlines() or ["no output"])[-1]
    return result


FP8_REFS, FP8_WARMUP, FP8_REPEATS, FP8_STEPS = 1, 2, 5, 4


def _difference(test, reference, peak: float | None = None) -> dict:
    """How far `test` is from `reference`: mean and max |diff|, relative L2 and PSNR in dB, whose peak is
    `peak` (255 for 8-bit images) or else the reference's range (max - min); None where they are equal."""
    import math

    test, reference = test.detach().float(), reference.detach().float()
    diff = test - reference
    mse = diff.pow(2).mean().item()
    peak = peak if peak is not None else (reference.max() - reference.min()).item()
    norm = reference.norm().item()
    return {"mean_abs": diff.abs().mean().item(), "max_abs": diff.abs().max().item(),
            "reference_max_abs": reference.abs().max().item(), "rel_l2": diff.norm().item() / norm if norm else None,
            "psnr_db": 10 * math.log10(peak * peak / mse) if mse > 0 and peak > 0 else None}


def _bytes_gib(module) -> float:
    held = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in held) / GIB


def stage_fp8(args) -> dict:
    """FP8 against bf16 on the cached transformer step (the served transformer_cached graph), same random
    weights, same inputs: bf16 first, then the same module with its linears swapped to FP8 in place
    (flux2_serving.models.fp8_linear.to_fp8, TRANSFORMER_KEEP stays bf16), so the FP8 figures' peak memory
    holds the FP8 weights only. Inputs as bench.gpu_probe builds them; the reference K/V from our bf16 prefill,
    the same for both. Compared: one step's output (sigma 0.75), the latents after 4 Euler steps (sigmas 1,
    0.75, 0.5, 0.25 -> 0) from the same noise, and those latents decoded by a random-weight VAE of the same
    dims (8-bit images)."""
    # torch, diffusers (bench.gpu_probe's inputs, export.components) and the FP8 layer: heavy, may be missing,
    # fail this stage only
    import torch

    from bench import gpu_probe
    from flux2_serving.modeling import components as C
    from flux2_serving.models.fp8_linear import TRANSFORMER_KEEP, fp8_matmul_device, fp8_paths, to_fp8

    gpu_probe._load_torch()
    device = torch.device(args.device)
    dev = gpu_probe.Device(device)
    size = "9b" if device.type == "cuda" else "tiny"
    shape, grid, dtype = gpu_probe.SHAPES[size], gpu_probe.SHAPES[size]["img_grid"], torch.bfloat16
    result = {"size": size, "device_name": dev.name, "dtype": "bf16", "side": grid * 16, "refs": FP8_REFS,
              "text_len": shape["text_len"], "warmup": FP8_WARMUP, "repeats": FP8_REPEATS, "steps": FP8_STEPS,
              "timer": "cuda events" if dev.cuda else "time.perf_counter", "memory": dev.memory_kind,
              "fp8_matmul_device": fp8_matmul_device(device),
              "compared": "step output, latents after 4 steps, decoded image (random-weight VAE, 8-bit levels)"}
    if dev.cuda:
        result["compute_capability"] = "{}.{}".format(*torch.cuda.get_device_capability(device))
    start = time.perf_counter()
    cached = C.build("transformer_cached", f"random:{size}", dtype, str(device))
    t = cached.transformer
    x = gpu_probe.step_inputs(t.config, shape, FP8_REFS, dtype, device)
    with torch.inference_mode():  # the reference K/V: our bf16 prefill, the same for both precisions
        prefill = C.TransformerPrefill(t)
        ref_kv = prefill(x["ref_latents"], x["ref_ids"])
    del prefill  # its shallow copies hold the double blocks' bf16 linears: gone before the swap frees them
    result["build_s"] = round(time.perf_counter() - start, 1)
    sigmas = [1.0 - i / FP8_STEPS for i in range(FP8_STEPS)] + [0.0]

    def step():
        return gpu_probe.cached_step(cached, x, grid, ref_kv)

    def denoise():
        latents = x["latents"]
        for now, after in zip(sigmas, sigmas[1:], strict=False):
            sigma = torch.full((1,), now, dtype=dtype, device=device)
            latents = latents + (after - now) * gpu_probe.cached_step(cached, x, grid, ref_kv, latents, sigma)
        return latents

    def measure(precision: str) -> tuple[dict, dict]:
        dev.free()
        figures = {"weights_gib": round(_bytes_gib(cached), 4)}
        with torch.inference_mode():
            for _ in range(FP8_WARMUP):
                step()
            dev.free()
            dev.reset_peak()
            times = [dev.time_ms(step)[1] for _ in range(FP8_REPEATS)]
            dev.sync()
            figures.update(median_ms=statistics.median(times), times_ms=[round(ms, 3) for ms in times],
                           peak_gib=round(dev.peak_gib(), 3))
            outputs = {"step": step(), "latents": denoise()}
        _log(f"fp8 stage: {precision} step {figures['median_ms']:.2f} ms, peak {figures['peak_gib']} GiB")
        return figures, outputs

    result["bf16"], bf16_out = measure("bf16")
    (args.out / "stage_f.json").write_text(json.dumps({**result, "ok": False, "error": "stopped before the FP8 "
                                                       "half was timed"}, indent=2, default=str) + "\n")
    start = time.perf_counter()
    result["fp8_linears"] = to_fp8(cached, TRANSFORMER_KEEP)
    result["kept_linears"] = sum(type(m) is torch.nn.Linear for m in cached.modules())
    result["swap_s"] = round(time.perf_counter() - start, 2)
    result["fp8"], fp8_out = measure("fp8")
    result["fp8"]["paths"] = fp8_paths(cached)
    result["step_output"] = _difference(fp8_out["step"], bf16_out["step"])
    result["latents_after_steps"] = _difference(fp8_out["latents"], bf16_out["latents"])
    cached = t = ref_kv = x = None  # the transformer and K/V go before the VAE comes
    dev.free()
    vae = C.build("vae_decoder", f"random:{size}", dtype, str(device))
    with torch.inference_mode():
        images = [((vae(out["latents"].reshape(1, grid, grid, -1)).float().clamp(-1, 1) + 1) * 127.5).round()
                  for out in (fp8_out, bf16_out)]
    result["image"] = _difference(*images, peak=255.0)
    result["image"]["shape"] = list(images[0].shape)
    result["speedup"] = result["bf16"]["median_ms"] / result["fp8"]["median_ms"]
    figures = [result[k][f] for k in ("bf16", "fp8") for f in ("median_ms", "peak_gib")]
    figures += [result[k][f] for k in ("step_output", "latents_after_steps", "image") for f in ("mean_abs", "max_abs")]
    problems = [] if all(math.isfinite(v) for v in figures) else ["a figure is not finite"]
    if result["fp8_matmul_device"] and set(result["fp8"]["paths"]) != {"_scaled_mm"}:
        problems.append(f"an FP8-capable GPU, yet paths {result['fp8']['paths']}")
    result["ok"] = not problems
    if problems:
        result["error"] = "; ".join(problems)
    return result


def stage_served(args) -> dict:
    """Served stack vs diffusers, same random weights (checkpoint.random_module), same device, same run."""
    # numpy, Pillow, the client and bench.overhead (tritonclient), export.loading (torch): may be missing, fail this
    # stage only
    import numpy as np
    from PIL import Image

    from bench.overhead import time_requests
    from flux2_serving.clients.api import Flux2Client
    from flux2_serving.modeling.loading import DTYPES

    out, device, dtype = args.out, args.device, _dtype_name(args.device)
    size = "9b" if device.startswith("cuda") else "tiny"
    side = 1024 if size == "9b" else 256
    text_len = 512  # the BLS's max_sequence_length (the envelope's) at both sizes
    checkpoint = _tiny_checkpoint(out)  # tokenizer and scheduler only
    rng = np.random.default_rng(1)

    def image(s):
        return Image.fromarray(rng.integers(0, 256, (s, s, 3), dtype=np.uint8))

    cases = {"text_to_image": [], "one_reference": [image(side)]}  # the headline: 4 references are not worth a box
    repeats = args.repeats
    result = {"size": size, "dtype": dtype, "side": side, "steps": 4, "repeats": repeats, "rows": []}

    def keep(note: str) -> None:  # what exists so far, in case the box runs out before the next figure
        (out / "stage_d.json").write_text(json.dumps({**result, "ok": False, "partial": True, "error": note},
                                                     indent=2, default=str) + "\n")

    stop_sampler = _device_memory_sampler(device)
    served_images = {}
    try:
        with torch_server(_manifest(f"random:{size}", out, dtype), checkpoint, out, device, size) as server, \
                Flux2Client(server.grpc) as client:
            for name, refs in cases.items():
                call = functools.partial(client.generate, f"served {name}", refs, seed=7, height=side, width=side,
                                         reuse_reference_cache=False)
                served_images[name] = np.asarray(call()[0])  # warm-up
                e2e, outside, stages = time_requests(server, call, repeats)
                result["rows"].append({"case": name, "refs": len(refs), "served_s": statistics.median(e2e),
                                       "outside_components_s": statistics.median(outside),
                                       "bls_stages_ms": {k: round(v, 2) for k, v in stages.items() if v > 0}})
                row = result["rows"][-1]
                row["outside_share"] = row["outside_components_s"] / row["served_s"]
                keep(f"stopped after serving {name}")
    finally:
        result["served_peak_memory_gib"] = stop_sampler()
    keep("stopped before the diffusers pipelines were timed")
    # diffusers on the very same random weights, in this process, after the server has gone.
    stop_sampler = _device_memory_sampler(device)
    modules = {"text_encoder": random_module("text_encoder", size, DTYPES[dtype], device),
               "vae": random_module("vae", size, DTYPES[dtype], device),
               "transformer": random_module("transformer", size, DTYPES[dtype], device)}
    kv, plain = _pipelines(str(checkpoint), device, DTYPES[dtype], modules)
    for row in result["rows"]:
        refs = cases[row["case"]]
        for key, pipe in (("diffusers_kv_s", kv), ("diffusers_no_kv_s", plain)):
            run = functools.partial(_pipeline_images, pipe, device, f"served {row['case']}", refs, 7, height=side,
                                    width=side, num_inference_steps=4, max_sequence_length=text_len)
            first = run()
            if key == "diffusers_kv_s":
                row["vs_served"] = _compare(served_images[row["case"]], first[0], dtype)
            times = []
            for _ in range(repeats):
                _sync(device)
                start = time.perf_counter()
                run()
                _sync(device)
                times.append(time.perf_counter() - start)
            row[key] = statistics.median(times)
            row["served_vs_kv" if key == "diffusers_kv_s" else "served_vs_no_kv"] = row[key] / row["served_s"]
            keep(f"stopped after timing {key} on {row['case']}")
    result["diffusers_peak_memory_gib"] = stop_sampler()
    result["ok"] = True
    return result  # the stage's process ends here: its GPU memory goes with it


def stage_export(args) -> dict:
    """The cached-step graph at the served dims, bf16, exported as `python -m flux2_serving.export` does (the onnxscript
    optimizer included: without it the graph keeps sequence ops that TensorRT's parser lacks)."""
    # torch, and the export modules that import torch, diffusers and onnx: heavy, may be missing, fail this stage only
    import torch

    from flux2_serving.export.onnx_export import OPSET, dynamic_shapes, sample_inputs
    from flux2_serving.export.trt_compat import check_graph
    from flux2_serving.modeling import components as C
    from flux2_serving.modeling.loading import read_model_dims

    size = "9b" if args.device.startswith("cuda") else "tiny"
    dims = read_model_dims(f"random:{size}")
    spec = graph_specs(dims)["transformer_cached"]
    start = time.perf_counter()
    wrapper = C.TransformerCached(random_module("transformer", size, torch.bfloat16, "cpu")).eval()
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        path = Path(tmp) / "model.onnx"
        with torch.no_grad(), C.float32_rope():
            program = torch.onnx.export(wrapper, sample_inputs("transformer_cached", dims, torch.bfloat16), dynamo=True,
                                        opset_version=OPSET, input_names=[t.name for t in spec.inputs],
                                        output_names=[t.name for t in spec.outputs],
                                        dynamic_shapes=dynamic_shapes(spec), external_data=True, optimize=True)
        program.save(str(path), external_data=True)
        export_s = time.perf_counter() - start
        size_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir())
        report = check_graph(path)
    return {"size": size, "export_s": round(export_s, 1), "file_gib": round(size_bytes / GIB, 2),
            "peak_host_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 1),
            "trt_check_ok": report.ok, "trt_problems": report.problems[:5], "ok": report.ok,
            **({} if report.ok else {"error": "; ".join(report.problems[:3])})}


# ---------------------------------------------------------------------------------- report


def markdown(results: dict) -> str:
    env = results["stages"].get("a", {})
    card = env.get("gpu") or "no GPU (CPU run)"
    lines = ["## GPU check (`make gpu-check`)", "",
             f"Card: {card}; device {results['device']}; driver {env.get('driver', '-')}; "
             f"torch {env.get('torch', '-')} (CUDA {env.get('cuda', '-')}); Python {env.get('python', '-')}; "
             f"{results['started']}; {results['seconds']:.0f} s.", "", "| stage | status | result |", "|---|---|---|"]
    for letter, name in STAGES.items():
        stage = results["stages"].get(letter)
        if stage is None:
            continue
        status = "skipped" if stage.get("skipped") else ("ok" if stage.get("ok") else "FAILED")
        lines.append(f"| {letter} {name} | {status} | {_summary(letter, stage)} |")
    lines += _fp8_markdown(results["stages"].get("f", {}))
    served = results["stages"].get("d", {})
    if served.get("rows"):  # partial figures too (a box that ran out keeps what it measured)
        lines += ["", f"Served stack (torch flavor, {served['size']} dims, random weights, {served['dtype']}, "
                      f"{served['side']}x{served['side']}, 4 steps, medians of {served['repeats']}; "
                      "references recomputed every request):", "",
                  "| case | served e2e (s) | outside components | diffusers KV (s) | no-KV (s) | served vs KV | "
                  "served vs no-KV | served vs KV image |", "|---|---:|---:|---:|---:|---:|---:|---|"]
        def cell(row, key, fmt, suffix=""):
            return format(row[key], fmt) + suffix if key in row else "- (not reached)"

        for row in served["rows"]:
            vs = row.get("vs_served", {})
            lines.append(f"| {row['case']} | {row['served_s']:.3f} | {row['outside_components_s'] * 1e3:.0f} ms "
                         f"({row['outside_share']:.0%}) | {cell(row, 'diffusers_kv_s', '.3f')} | "
                         f"{cell(row, 'diffusers_no_kv_s', '.3f')} | {cell(row, 'served_vs_kv', '.2f', 'x')} | "
                         f"{cell(row, 'served_vs_no_kv', '.2f', 'x')} | mean diff {vs.get('mean_diff', '-')} |")
        lines += ["", "BLS stages outside the component calls (ms per request, flux2_bls_stage_seconds_total; "
                  "reference decoding and the cache key included, since these requests bypass the cache):", ""]
        for row in served["rows"]:
            own = {k: v for k, v in row.get("bls_stages_ms", {}).items() if not k.startswith("call:")}
            lines.append(f"- {row['case']}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(own.items())))
        lines.append("")
        measured = "whole GPU, nvidia-smi" if results["device"] != "cpu" else "process tree RSS"
        lines.append(f"Peak memory: served {served.get('served_peak_memory_gib', '-')} GiB, diffusers "
                     f"{served.get('diffusers_peak_memory_gib', '- (not reached)')} GiB ({measured}).")
    return "\n".join(lines)


def _fp8_markdown(fp8: dict) -> list[str]:
    """The FP8 stage's table (empty when it did not succeed)."""
    if not fp8.get("ok"):
        return []

    def psnr(diff):
        return "identical" if diff["psnr_db"] is None else f"PSNR {diff['psnr_db']:.1f} dB"

    def paths(counts):
        return ", ".join(f"`{path}` x {count}" for path, count in sorted(counts.items()))

    rows = [("bf16", fp8["bf16"], "torch.nn.Linear (bf16)"),
            ("FP8 E4M3, per-tensor scales", fp8["fp8"], paths(fp8["fp8"]["paths"]))]
    lines = ["", f"FP8 against bf16, the cached transformer step (flux2_serving.models.fp8_linear; {fp8['size']} "
                 f"dims, random weights, {fp8['refs']} reference and a {fp8['side']}x{fp8['side']} output, "
                 f"{fp8['text_len']} text tokens; median of {fp8['repeats']} steps after {fp8['warmup']} warm-up, "
                 f"{fp8['timer']}; {fp8['device_name']}"
                 + (f", compute capability {fp8['compute_capability']}" if fp8.get("compute_capability") else "")
                 + "):", "",
             "| precision | step (ms) | peak memory (GiB) | weights (GiB) | matmul path (layers) |",
             "|---|---:|---:|---:|---|"]
    lines += [f"| {name} | {row['median_ms']:.2f} | {row['peak_gib']:.3g} | {row['weights_gib']:.3g} | {path} |"
              for name, row, path in rows]
    step, latents, image = fp8["step_output"], fp8["latents_after_steps"], fp8["image"]
    lines += ["", f"FP8 step {fp8['speedup']:.2f}x the bf16 step's speed; {fp8['fp8_linears']} linear layers in FP8, "
                  f"{fp8['kept_linears']} kept in bf16 (embedders, modulation, output head: TRANSFORMER_KEEP); the "
                  "input scales are dynamic (each call's amax, unfused eager quantization). FP8 against bf16: step "
                  f"output mean |diff| {step['mean_abs']:.4g}, max {step['max_abs']:.4g} (max |bf16| "
                  f"{step['reference_max_abs']:.4g}), {psnr(step)}; latents after {fp8['steps']} steps mean |diff| "
                  f"{latents['mean_abs']:.4g}, {psnr(latents)}; decoded {image['shape'][-1]}x{image['shape'][-2]} "
                  f"image (random-weight VAE) mean {image['mean_abs']:.2f}, max {image['max_abs']:.0f} levels, "
                  f"{psnr(image)}. Peak memory: {fp8['memory']}, weights included."]
    if fp8["size"] != "9b" or not fp8["fp8_matmul_device"]:
        lines += ["", "No FP8 matmul ran here (the fallback path: the same FP8 operands, dequantized): a rehearsal of "
                      "the stage; its times and memory say nothing about FP8 on a GPU."]
    return lines


def _summary(letter: str, stage: dict) -> str:
    if stage.get("skipped"):
        return stage["skipped"]
    if not stage.get("ok"):
        partial = f" (partial: {_summary(letter, {**stage, 'ok': True})})" if stage.get("partial") else ""
        return str(stage.get("error", "failed"))[:300] + partial
    if letter == "a":
        return f"{stage.get('gpu', 'CPU')}, {stage.get('gpu_memory_gib', '-')} GiB; tritonserver and stub load"
    if letter == "b":
        worst = max(c["mean_diff"] for c in stage["cases"].values())
        return (f"{len(stage['cases'])} cases equal diffusers ({stage['dtype']}, worst mean diff {worst} levels); "
                f"cache hit = miss; outputs on {', '.join(stage['bls_output_devices'])}")
    if letter == "c":
        return "see the GPU probe section"
    if letter == "f":
        step = stage["step_output"]["psnr_db"]
        return (f"{stage['size']} step: FP8 {stage['fp8']['median_ms']:.2f} ms vs bf16 "
                f"{stage['bf16']['median_ms']:.2f} ms, peak {stage['fp8']['peak_gib']:.2f} vs "
                f"{stage['bf16']['peak_gib']:.2f} GiB, step PSNR "
                f"{'inf' if step is None else f'{step:.1f}'} dB; paths {stage['fp8']['paths']}")
    if letter == "d":
        return "; ".join(f"{r['case']} {r['served_s']:.2f} s"
                         + (f" (diffusers KV {r['diffusers_kv_s']:.2f} s)" if "diffusers_kv_s" in r else "")
                         for r in stage["rows"])
    if letter == "e":
        return (f"{stage['size']} transformer_cached: {stage['export_s']} s, {stage['file_gib']} GiB, peak RSS "
                f"{stage['peak_host_rss_gib']} GiB, TensorRT compatibility (no TensorRT run) "
                f"{'ok' if stage['trt_check_ok'] else 'failed'}")
    return ""


# ---------------------------------------------------------------------------------- driver


def run_stage(args) -> dict:
    letter = args.stage
    if letter == "a":
        return stage_environment(args)
    if letter == "b":
        return stage_served_tiny(args)
    if letter == "c":
        return stage_probe(args, args.limit_s)
    if letter == "d":
        return stage_served(args)
    if letter == "f":
        return stage_fp8(args)
    return stage_export(args)


def parse_args(argv):
    parser = command_parser("bench.gpu_check", __doc__)
    parser.add_argument("--device", default=None, help="cuda:N or cpu (default: cuda:0 when a GPU is visible)")
    parser.add_argument("--stages", default=None,
                        help=f"letters to run, in order (default {DEFAULT_STAGES}; e, the 9B export, only when named; "
                             "on the CPU c is skipped and d, b, f, e run at the tiny size)")
    parser.add_argument("--plan", action="store_true",
                        help="print each stage's time box with the estimate it comes from, and whether they fit "
                             "--budget-s; run nothing")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "gpu_check", help="results folder")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"the whole run, the bundle's venv included (default {GPU_BUDGET_S:.0f} on a GPU; "
                             f"{CPU_BUDGET_S:.0f} for the CPU rehearsal, whose tiny stages the GPU boxes do not fit)")
    parser.add_argument("--repeats", type=int, default=2, help="timed requests per case in stage d (default 2)")
    parser.add_argument("--bundle", type=Path, default=ROOT / "build" / "gpu_bundle",
                        help="what python -m bench.gpu_bundle wrote, used where packages are missing")
    parser.add_argument("--benchmarks", type=Path, default=None,
                        help="also write the GPU section of this BENCHMARKS.md (on a GPU only: a CPU run never does)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)  # child process: one stage
    parser.add_argument("--limit-s", type=float, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plan:
        text, fits = plan(args.budget_s or GPU_BUDGET_S, args.stages or DEFAULT_STAGES)
        print(text)
        return 0 if fits else 1
    # The budget counts from the first start, before the bundle's venv (the re-exec'd process inherits it).
    os.environ.setdefault("FLUX2_GPU_CHECK_T0", str(time.time()))
    if args.stage:  # child: run one stage, write its result
        try:
            result = run_stage(args)
        except Exception as exc:  # any failure: one line for the report, the traceback for the log
            traceback.print_exc()
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        (args.out / f"stage_{args.stage}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
        return 0

    missing = ready_here()
    if missing and not os.environ.get("FLUX2_GPU_VENV"):
        if (args.bundle / "site.tar.xz").exists():
            enter_bundle_venv(args.bundle, argv)  # does not return
        print(f"error: this Python lacks {', '.join(missing)}; run `python -m bench.gpu_bundle` where packages "
              "install and bring build/gpu_bundle here", file=sys.stderr)
        return 2
    import torch  # only now: this Python may lack it until the bundle's venv is entered above

    device = args.device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    stages = args.stages or DEFAULT_STAGES  # on the CPU, c reports itself skipped
    results = {"device": device, "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "stages": {},
               "seconds": 0.0}
    t0 = float(os.environ["FLUX2_GPU_CHECK_T0"])
    budget_s = args.budget_s or (GPU_BUDGET_S if device.startswith("cuda") else CPU_BUDGET_S)
    runnable = "".join(s for s in stages if device.startswith("cuda") or s not in GPU_ONLY)
    stage_budget = budget_s - (time.time() - t0)  # what the set-up left
    start = time.monotonic()
    on_gpu = device.startswith("cuda")
    if args.benchmarks and not on_gpu:
        _log(f"CPU run: {args.benchmarks}'s GPU section is left as it is (the report is {args.out / 'report.md'})")
    for letter in stages:
        left = stage_budget - (time.monotonic() - start)
        boxes = BOX_S if on_gpu else CPU_BOX_S
        planned = stage_limit(letter, stage_budget, runnable, boxes) if letter in runnable else 0
        limit = min(planned, left)
        if letter in GPU_ONLY and not device.startswith("cuda"):
            results["stages"][letter] = {"skipped": "needs a GPU"}
        elif limit < planned / 2:  # an earlier stage overran: less than half its box is no measurement
            results["stages"][letter] = {"skipped": f"{left:.0f} s of the {budget_s:.0f} s budget left"}
        else:
            _log(f"stage {letter} ({STAGES[letter]}), up to {limit:.0f} s ...")
            result_path = args.out / f"stage_{letter}.json"
            result_path.unlink(missing_ok=True)
            cmd = [sys.executable, "-m", "bench.gpu_check", "--stage", letter, "--device", device,
                   "--out", str(args.out), "--limit-s", str(limit), "--repeats", str(args.repeats)]
            with open(args.out / f"stage_{letter}.log", "w") as log:
                ran_out = False
                try:
                    subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=limit, check=False)
                except subprocess.TimeoutExpired:
                    ran_out = True
            stage = (json.loads(result_path.read_text()) if result_path.exists() else
                     {"ok": False, "error": f"no result within {limit:.0f} s (see {log.name})"})
            if ran_out and result_path.exists():  # what it wrote before its box ran out: partial figures, kept
                stage.update(ok=False, error=f"its {limit:.0f} s box ran out ({stage.get('error', 'no note')})")
            results["stages"][letter] = stage
        stage = results["stages"][letter]
        _log(f"stage {letter}: " + ("skipped: " if stage.get("skipped") else "ok: " if stage.get("ok") else "FAILED: ")
             + _summary(letter, stage))
        results["seconds"] = time.time() - t0
        (args.out / "gpu_check.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.out / "report.md").write_text(markdown(results) + "\n")
        if args.benchmarks and on_gpu:
            write_section("gpu_check", markdown(results), args.benchmarks)
    print(markdown(results))
    failed = [k for k, v in results["stages"].items() if not v.get("ok") and not v.get("skipped")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
