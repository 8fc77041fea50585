"""GPU probe: time diffusers' KV transformer steps against our prefill/cached wrappers.

One prepared script for a GPU session (one H100/H200, <= 8 minutes), also runnable on the
CPU at the tiny size so that it is tested here::

    python -m bench.gpu_probe --json build/probe.json --markdown build/probe.md
    python -m bench.gpu_probe --size tiny --device cpu --repeats 2

It builds `diffusers.Flux2Transformer2DModel` with random weights (klein 9B dims, or the
project's tiny dims from `export.checkpoint`) and times, per number of references
(default 0, 1 and 4 references of 1024x1024, i.e. 4096 tokens each at 9B):

* diffusers' step 0 with references: the plain transformer forward with
  `kv_cache_mode="extract"` over [text, references, image], as `Flux2KleinKVPipeline` calls it;
* diffusers' later steps: `kv_cache_mode="cached"` with the cache that extract returned
  (with 0 references: the plain forward, the pipeline's text-to-image step);
* ours: `export.components.TransformerPrefill` (references alone -> K/V of every layer);
* ours: `export.components.TransformerCached` (one step from that K/V; N_ref = 0 for
  text-to-image), whose output is compared with diffusers' cached step on the same inputs.

Every measurement is the median of `--repeats` timed calls after `--warmup` calls, under
`torch.inference_mode()`: CUDA events on a GPU, `time.perf_counter` on the CPU. Peak memory
is `torch.cuda.max_memory_allocated` (reset before each measurement; it includes the
weights and the inputs that the step needs, e.g. the K/V cache) or, on the CPU, the
process's peak RSS (`resource.getrusage`, reset through /proc/self/clear_refs when the
kernel allows it).

Time budget at 9B in bf16 (arithmetic, H100 SXM ~990 TFLOPS dense bf16 peak; assume a
pessimistic 25%, ~250 TFLOPS, for eager PyTorch):

* build: 9.08e9 parameters = 18.2 GB (16.9 GiB) allocated and initialised on the GPU by
  kernels (a few seconds; no CPU init, no host->device copy); importing torch/diffusers and
  creating the CUDA context ~20 s.
* biggest call, diffusers extract with 4 refs: 512 text + 4x4096 ref + 4096 image = 20992
  tokens. Linear layers ~2 x 9.1e9 x 20992 ~ 3.8e14 FLOP (upper bound: the double blocks'
  text stream only sees 512 tokens); attention per layer 4 x 4608 x 20992 x 4096 (text+image
  queries over all keys) + 4 x 16384^2 x 4096 (reference self-attention) ~ 6e12, x 32
  layers ~ 1.9e14. Total ~5.7e14 FLOP ~ 2.3 s at 250 TFLOPS.
* our prefill with 4 refs (16386 tokens): ~2 x 9.1e9 x 16386 + 32 x 4.4e12 ~ 4.4e14 ~ 1.8 s;
  cached steps (4096 image + 512 text queries, keys up to 20992): ~1.3e14 ~ 0.5 s each;
  1-ref calls are 2-4x cheaper than 4-ref calls.
* all 10 measurements x (1 warm-up + 5 repeats) ~ 6 x (2.3 + 1.8 + 2 x 0.5 + 1-ref ~2 +
  0-ref ~0.6) ~ 46 s, plus checks and `empty_cache` between stages: about 1.5 minutes
  in all, 2 at the outside; `--budget-s` (default 420 s) skips the remaining stages if
  it were ever exceeded, and the JSON/markdown are still written.
* memory peak: 16.9 GiB weights + 8 GiB K/V of 4 refs (32 layers x 2 x 16384 x 4096 x 2 B)
  + a single block's fused projection over 20992 tokens (20992 x 36864 x 2 B = 1.4 GiB)
  and its temporaries: ~30 GiB, well inside 78 GiB.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import resource
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from export.checkpoint import KLEIN_9B_TRANSFORMER as KLEIN_9B_CONFIG

# Token shapes per size: text length, reference and output latent grid side (pixels / 16).
SHAPES = {
    "9b": dict(text_len=512, ref_grid=64, img_grid=64),  # 1024x1024 references and output
    "tiny": dict(text_len=8, ref_grid=4, img_grid=4),  # 16 tokens per reference / image
    "bench": dict(text_len=8, ref_grid=4, img_grid=4),  # make bench's width; it sets the token counts
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GIB = 2**30

HELP = __doc__.split("\n\n")[0] + """

Times, after warm-up, the median of N calls of: diffusers' extract step (step 0 with
references), diffusers' cached step (with 0 references: its plain step), our
TransformerPrefill and our TransformerCached, for each reference count in --refs; records
peak memory per measurement, the weights' size, and the max abs difference between our
cached step and diffusers' on the same inputs (and between our prefill K/V and diffusers'
extracted K/V on the first/last double and single blocks). Prints a markdown table; writes
JSON (--json) and a '## GPU probe' markdown section (--markdown)."""


def _log(start: float, message: str) -> None:
    print(f"[{time.perf_counter() - start:7.1f}s] {message}", flush=True)


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class Device:
    """Timing, synchronisation and peak-memory accounting for one device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    @property
    def name(self) -> str:
        if self.cuda:
            return torch.cuda.get_device_name(self.device)
        return f"CPU: {_cpu_name()} ({torch.get_num_threads()} threads)"

    @property
    def total_memory_gib(self):
        if self.cuda:
            return round(torch.cuda.get_device_properties(self.device).total_memory / GIB, 2)
        return None

    @property
    def memory_kind(self) -> str:
        return "torch.cuda.max_memory_allocated" if self.cuda else "process peak RSS (getrusage ru_maxrss)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def allocated_gib(self) -> float:
        if self.cuda:
            return torch.cuda.memory_allocated(self.device) / GIB
        return _current_rss_gib()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            # "5" resets the process's RSS high-water mark (Linux >= 4.0); best effort.
            with contextlib.suppress(OSError):
                Path("/proc/self/clear_refs").write_text("5")

    def peak_gib(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux

    def time_ms(self, fn):
        """Run `fn` once and return (its output, elapsed ms)."""
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            return out, start.elapsed_time(end)
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1e3


def _current_rss_gib() -> float:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def build_transformer(size: str, device: torch.device, dtype: torch.dtype, seed: int):
    """Random-weight Flux2Transformer2DModel, made directly on `device` in `dtype`."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    if size != "9b":
        from export.checkpoint import build_transformer as build_small

        model = build_small(size).to(device)
        if dtype != torch.float32:  # (diffusers warns on any `.to(dtype)`, even to fp32)
            model = model.to(dtype)
        return model.eval()
    # Parameters are allocated on the device in the target dtype and initialised there by
    # nn.Linear's own init kernels: no 36 GB fp32 CPU init, no host->device copy.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Flux2Transformer2DModel(**KLEIN_9B_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def _tokens_desc(shape: dict, refs: int, size: str) -> dict:
    ref_tok, img_tok = shape["ref_grid"] ** 2, shape["img_grid"] ** 2
    px = "" if size != "9b" else f" ({shape['img_grid'] * 16}x{shape['img_grid'] * 16})"
    ref_px = "" if size != "9b" else f" ({shape['ref_grid'] * 16}x{shape['ref_grid'] * 16})"
    refs_txt = f"{refs}x{ref_tok} ref tok{ref_px}"
    kv_txt = f"cached K/V of {refs_txt}" if refs else "empty K/V (N_ref = 0)"
    return {
        "extract": f"txt {shape['text_len']} + {refs_txt} + img {img_tok} tok{px}, B=1",
        "cached": f"txt {shape['text_len']} + img {img_tok} tok{px}, {kv_txt}, B=1",
        "plain": f"txt {shape['text_len']} + img {img_tok} tok{px}, no refs, B=1",
        "prefill": f"{refs_txt} (+1 dummy txt, +1 dummy img tok)",
    }


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= 0.1 * GIB else f"{n / 2**20:.2f} MiB"


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


class Probe:
    def __init__(self, args, argv):
        self.args = args
        self.argv = argv
        self.start = time.perf_counter()
        self.dev = Device(torch.device(args.device))
        self.dtype = DTYPES[args.dtype]
        self.shape = dict(SHAPES[args.size])
        for key in ("text_len", "ref_grid", "img_grid"):
            if getattr(args, key) is not None:
                self.shape[key] = getattr(args, key)
        self.measurements: list[dict] = []
        self.checks: dict[str, dict] = {"cached_max_abs_diff": {}, "cached_max_abs_ref": {}, "kv_max_abs_diff": {}}

    def log(self, message: str) -> None:
        _log(self.start, message)

    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    # ---------------------------------------------------------------- measuring
    def measure(self, name: str, label: str, refs: int, shape: str, fn):
        """Warm up, then time `fn` `repeats` times; record the median and the peak memory.

        Returns fn's last output, or None if the stage was skipped or failed.
        """
        record = {"name": name, "label": label, "refs": refs, "shape": shape}
        self.measurements.append(record)
        if fn is None:
            record["error"] = "skipped: an input stage failed"
            self.log(f"{label}, {refs} ref(s): skipped (an input stage failed)")
            return None
        if self.over_budget():
            record["error"] = f"skipped: time budget of {self.args.budget_s:.0f} s exceeded"
            self.log(f"{label}, {refs} ref(s): skipped (time budget)")
            return None
        self.log(f"{label}, {refs} ref(s): {shape}")
        out = None
        try:
            with torch.inference_mode():
                for _ in range(self.args.warmup):
                    out = None
                    out = fn()
                out = None
                self.dev.free()
                held = self.dev.allocated_gib()
                self.dev.reset_peak()
                times = []
                for _ in range(self.args.repeats):
                    out = None  # the previous output (e.g. a K/V cache) is not held during the next call
                    out, ms = self.dev.time_ms(fn)
                    times.append(ms)
                self.dev.sync()
                peak = self.dev.peak_gib()
        except torch.cuda.OutOfMemoryError as error:  # keep going: the other rows still matter
            out = None
            self.dev.free()
            record["error"] = f"CUDA out of memory: {str(error).splitlines()[0]}"
            self.log(f"  -> {record['error']}")
            return None
        record.update(
            median_ms=statistics.median(times),
            times_ms=[round(t, 4) for t in times],
            peak_gib=round(peak, 4),
            held_before_gib=round(held, 4),
        )
        self.log(f"  -> median {record['median_ms']:.2f} ms over {len(times)} (peak {peak:.2f} GiB)")
        return out

    # ---------------------------------------------------------------- inputs
    def inputs(self, refs: int):
        from diffusers import Flux2KleinKVPipeline as P

        t, d, dt = self.transformer, self.dev.device, self.dtype
        cfg = t.config
        g_img, g_ref, length = self.shape["img_grid"], self.shape["ref_grid"], self.shape["text_len"]
        gen = torch.Generator(device="cpu").manual_seed(self.args.seed + 1 + refs)

        def randn(*size):
            return torch.randn(*size, generator=gen).to(device=d, dtype=dt)

        prompt_embeds = randn(1, length, cfg.joint_attention_dim)
        latents = randn(1, g_img * g_img, cfg.in_channels)
        txt_ids = P._prepare_text_ids(prompt_embeds.cpu())[0].to(d)
        img_ids = P._prepare_latent_ids(torch.empty(1, 1, g_img, g_img))[0].to(d)
        if refs:
            ref_latents = randn(1, refs * g_ref * g_ref, cfg.in_channels)
            ref_ids = P._prepare_image_ids([torch.empty(1, 1, g_ref, g_ref)] * refs)[0].to(d)
        else:
            ref_latents, ref_ids = None, None
        return dict(
            prompt_embeds=prompt_embeds,
            latents=latents,
            txt_ids=txt_ids,
            img_ids=img_ids,
            ref_latents=ref_latents,
            ref_ids=ref_ids,
            # step 0 runs at sigma 1.0 (t/1000); a later step at 0.75
            sigma0=torch.full((1,), 1.0, dtype=dt, device=d),
            sigma=torch.full((1,), 0.75, dtype=dt, device=d),
        )

    def kv_layers(self) -> list[int]:
        """First/last double and first/last single block (all 4 layers at the tiny size)."""
        nd = len(self.transformer.transformer_blocks)
        nl = nd + len(self.transformer.single_transformer_blocks)
        return sorted({0, nd - 1, nd, nl - 1})

    # ---------------------------------------------------------------- stages
    def run_refs(self, refs: int) -> None:
        from export.components import TransformerCached, TransformerPrefill

        t = self.transformer
        x = self.inputs(refs)
        desc = _tokens_desc(self.shape, refs, self.args.size)
        prefill, cached = TransformerPrefill(t), TransformerCached(t)  # both install the KV processors

        def diffusers_cached_call(cache):
            # Flux2KleinKVPipeline steps 1+ (or every step without references)
            kwargs = dict(kv_cache=cache, kv_cache_mode="cached") if cache is not None else {}
            return t(hidden_states=x["latents"], timestep=x["sigma"], guidance=None,
                     encoder_hidden_states=x["prompt_embeds"], txt_ids=x["txt_ids"], img_ids=x["img_ids"],
                     return_dict=False, **kwargs)[0]

        def ours_cached_call(ref_kv):
            # The graph's layout: latent grid [B, g, g, C], ids on the grid, one K/V tensor per block.
            b, g = x["latents"].shape[0], self.shape["img_grid"]
            out = cached(x["latents"].reshape(b, g, g, -1), x["prompt_embeds"], x["sigma"].expand(b),
                         x["img_ids"].reshape(g, g, 4), x["txt_ids"], *ref_kv)
            return out.reshape(b, g * g, -1)

        if refs == 0:
            reference = self.measure("diffusers_plain_0ref", "diffusers plain step (text-to-image)", 0,
                                     desc["plain"], lambda: diffusers_cached_call(None))
            heads, head_dim = t.config.num_attention_heads, t.config.attention_head_dim
            empty_kv = [torch.zeros(2, 0, heads, head_dim, dtype=self.dtype, device=self.dev.device)] * (
                len(t.transformer_blocks) + len(t.single_transformer_blocks))
            ours = self.measure("ours_cached_0ref", "ours: TransformerCached", 0, desc["cached"],
                                lambda: ours_cached_call(empty_kv))
            self._check_cached(refs, ours, reference)
            return

        n_ref = x["ref_latents"].shape[1]

        def diffusers_extract_call():
            # Flux2KleinKVPipeline step 0: [ref, img] tokens, K/V extracted in the same forward
            return t(hidden_states=torch.cat([x["ref_latents"], x["latents"]], dim=1),
                     timestep=x["sigma0"], guidance=None, encoder_hidden_states=x["prompt_embeds"],
                     txt_ids=x["txt_ids"], img_ids=torch.cat([x["ref_ids"], x["img_ids"]], dim=0),
                     return_dict=False, kv_cache_mode="extract", num_ref_tokens=n_ref)

        out = self.measure(f"diffusers_extract_{refs}ref", "diffusers extract step (step 0)", refs,
                           desc["extract"], diffusers_extract_call)
        cache = out[1] if out is not None else None
        out = None
        reference = self.measure(f"diffusers_cached_{refs}ref", "diffusers cached step", refs, desc["cached"],
                                 (lambda: diffusers_cached_call(cache)) if cache is not None else None)
        # Keep a few layers of diffusers' K/V on the host, then drop the cache so that it does
        # not count in our stages' peak memory.
        layers = self.kv_layers()
        saved = None
        if cache is not None:
            all_layers = cache.double_block_caches + cache.single_block_caches
            saved = {i: torch.stack(all_layers[i].get(), dim=0)[:, 0].float().cpu() for i in layers}
        cache = None
        self.dev.free()

        ref_kv = self.measure(f"ours_prefill_{refs}ref", "ours: TransformerPrefill", refs, desc["prefill"],
                              lambda: prefill(x["ref_latents"], x["ref_ids"]))
        if ref_kv is not None and saved is not None:
            diff = max(_max_abs_diff(ref_kv[i], saved[i]) for i in layers)
            self.checks["kv_max_abs_diff"][str(refs)] = diff
            self.log(f"  K/V check (layers {layers}): max |ours - diffusers| = {diff:.3g}")
        saved = None
        ours = self.measure(f"ours_cached_{refs}ref", "ours: TransformerCached", refs, desc["cached"],
                            (lambda: ours_cached_call(ref_kv)) if ref_kv is not None else None)
        self._check_cached(refs, ours, reference)
        ref_kv = None
        self.dev.free()

    def _check_cached(self, refs: int, ours, reference) -> None:
        if ours is None or reference is None:
            return
        diff = _max_abs_diff(ours, reference)
        scale = reference.detach().float().abs().max().item()
        self.checks["cached_max_abs_diff"][str(refs)] = diff
        self.checks["cached_max_abs_ref"][str(refs)] = scale
        self.log(f"  cached-step check: max |ours - diffusers| = {diff:.3g} (max |diffusers| = {scale:.3g})")

    # ---------------------------------------------------------------- main
    def run(self) -> dict:
        import diffusers

        args = self.args
        self.log(f"device {self.dev.name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
        self.log(f"building Flux2Transformer2DModel ({args.size}, {args.dtype}, random weights) on {args.device}")
        t0 = time.perf_counter()
        self.transformer = build_transformer(args.size, self.dev.device, self.dtype, args.seed)
        self.dev.sync()
        build_s = time.perf_counter() - t0
        params = sum(p.numel() for p in self.transformer.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in self.transformer.parameters())
        weight_bytes += sum(b.numel() * b.element_size() for b in self.transformer.buffers())
        self.log(f"built in {build_s:.1f} s: {_count(params)} parameters, {_size(weight_bytes)} of weights")

        for refs in args.refs:
            self.run_refs(refs)

        cfg = self.transformer.config
        return {
            "probe": "bench.gpu_probe",
            "command": self.command,
            "device": self.dev.name,
            "device_type": self.dev.device.type,
            "device_memory_gib": self.dev.total_memory_gib,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "size": args.size,
            "dtype": args.dtype,
            "shape": self.shape,
            "refs": list(args.refs),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "timer": "cuda events" if self.dev.cuda else "time.perf_counter",
            "memory": self.dev.memory_kind,
            "transformer_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()
                                   if not k.startswith("_")},
            "weights": {"parameters": params, "bytes": weight_bytes, "gib": round(weight_bytes / GIB, 4)},
            "build_s": round(build_s, 3),
            "measurements": self.measurements,
            "checks": self.checks,
            "total_s": round(time.perf_counter() - self.start, 2),
        }

    @property
    def command(self) -> str:
        return "python -m bench.gpu_probe" + ("" if not self.argv else " " + shlex.join(self.argv))


def markdown(result: dict) -> str:
    card = result["device"]
    if result["device_memory_gib"]:
        card += f" ({result['device_memory_gib']:.1f} GiB)"
    cuda = f" (CUDA {result['cuda']})" if result["device_type"] == "cuda" else ""
    lines = [
        "## GPU probe",
        "",
        f"Card: **{card}**; torch {result['torch']}{cuda}, diffusers {result['diffusers']}, "
        f"Python {result['python']}.",
        "",
        f"Command: `{result['command']}`",
        "",
        f"Random-weight `Flux2Transformer2DModel` ({result['size']}, {result['dtype']}): "
        f"{_count(result['weights']['parameters'])} parameters, {_size(result['weights']['bytes'])} of weights, "
        f"built in {result['build_s']:.1f} s. Median of {result['repeats']} calls after {result['warmup']} "
        f"warm-up call(s) ({result['timer']}), batch 1, under `torch.inference_mode()`; peak memory is "
        f"{result['memory']} per measurement (weights and held inputs included).",
        "",
        "| measurement | shape | median ms | peak memory GiB |",
        "|---|---|---:|---:|",
    ]
    for m in result["measurements"]:
        refs = f"{m['refs']} ref" + ("" if m["refs"] == 1 else "s")
        if "error" in m:
            lines.append(f"| {m['label']}, {refs} | {m['shape']} | {m['error']} | |")
        else:
            lines.append(f"| {m['label']}, {refs} | {m['shape']} | {m['median_ms']:.2f} | {m['peak_gib']:.2f} |")
    checks = result["checks"]
    if checks["cached_max_abs_diff"]:
        parts = [f"{n} ref(s) {d:.3g} (max |diffusers| {checks['cached_max_abs_ref'][n]:.3g})"
                 for n, d in checks["cached_max_abs_diff"].items()]
        lines += ["", "Max |ours - diffusers| of the cached step on the same inputs: " + "; ".join(parts) + "."]
    if checks["kv_max_abs_diff"]:
        parts = [f"{n} ref(s) {d:.3g}" for n, d in checks["kv_max_abs_diff"].items()]
        lines += ["", "Max |prefill K/V - diffusers' extracted K/V| (first/last double and single blocks): "
                  + "; ".join(parts) + "."]
    lines += ["", f"Total run time {result['total_s']:.0f} s.", ""]
    return "\n".join(lines)


def _refs(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of reference counts >= 0, e.g. 0,1,4")
    return values


def parse_args(argv):
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=sorted(SHAPES), default="9b",
                   help="transformer dims: klein 9B (default) or the project's tiny test dims (CPU, seconds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=default_device,
                   help=f"device (default here: {default_device})")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights and activations (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--refs", type=_refs, default=[0, 1, 4],
                   help="comma-separated reference counts to measure (default 0,1,4; 0 = text-to-image)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement (default 1)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (default 512 at 9B, 8 tiny)")
    p.add_argument("--ref-grid", type=int, default=None,
                   help="reference latent grid side = pixels/16 (default 64 = 1024x1024 at 9B, 4 tiny)")
    p.add_argument("--img-grid", type=int, default=None,
                   help="output latent grid side = pixels/16 (default 64 = 1024x1024 at 9B, 4 tiny)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the stages that would start after this many seconds (default 420)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    p.add_argument("--markdown", type=Path, default=None, help="write the '## GPU probe' section to this path")
    p.add_argument("--benchmarks", action="store_true",
                   help="also replace the GPU probe section of BENCHMARKS.md with this run's")
    args = p.parse_args(argv)
    if args.dtype is None:
        args.dtype = "bf16" if args.device == "cuda" else "fp32"
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available to this torch build")
    if args.device == "cpu" and args.size == "9b":
        p.error("--size 9b on the CPU would take tens of GiB and far more than the time budget; "
                "use --size tiny, or run on a GPU")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    probe = Probe(args, argv)
    result = probe.run()
    md = markdown(result)
    print()
    print(md)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        probe.log(f"wrote {args.json}")
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(md)
        probe.log(f"wrote {args.markdown}")
    if args.benchmarks:
        from bench.report import write_section

        probe.log(f"wrote {write_section('gpu_probe', md)}")
    failed = [m["name"] for m in result["measurements"] if "error" in m]
    if failed:
        probe.log(f"{len(failed)} measurement(s) not taken: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
