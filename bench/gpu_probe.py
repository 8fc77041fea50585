"""GPU probe: time diffusers' KV transformer steps against our prefill/cached wrappers.

One prepared script for a GPU session (one H100/H200, <= 8 minutes), also runnable on the
CPU at the tiny size so that it is tested here::

    python -m bench.gpu_probe --json build/probe.json --markdown build/probe.md
    python -m bench.gpu_probe --size tiny --device cpu --repeats 2

It builds `diffusers.Flux2Transformer2DModel` with random weights (klein 9B dims, or the
project's tiny dims from `flux2_serving.modeling.checkpoint`) and times, per number of references
(default 0, 1 and 4 references of 1024x1024, i.e. 4096 tokens each at 9B):

* diffusers' step 0 with references: the plain transformer forward with
  `kv_cache_mode="extract"` over [text, references, image], as `Flux2KleinKVPipeline` calls it;
* diffusers' later steps: `kv_cache_mode="cached"` with the cache that extract returned
  (with 0 references: the plain forward, the pipeline's text-to-image step);
* ours: `flux2_serving.modeling.components.TransformerPrefill` (references alone -> K/V of every layer);
* ours: `flux2_serving.modeling.components.TransformerCached` (one step from that K/V; N_ref = 0 for
  text-to-image), whose output is compared with diffusers' cached step on the same inputs.

Every measurement is the median of `--repeats` timed calls after `--warmup` calls, under
`torch.inference_mode()`: CUDA events on a GPU, `time.perf_counter` on the CPU. Peak memory
is `torch.cuda.max_memory_allocated` (reset before each measurement; it includes the
weights and the inputs that the step needs, e.g. the K/V cache) or, on the CPU, the
process's peak RSS (`resource.getrusage`, reset through /proc/self/clear_refs when the
kernel allows it).

Expected at 9B in bf16 on an H100 (arithmetic, not measured): about 1.5-2 minutes in all, peak
~30 GiB (16.9 GiB of weights, 8 GiB of K/V for 4 references, one block's activations);
`--budget-s` skips the remaining stages if a run ever goes over.

`run(**options)` runs it in-process (`make bench` and `make gpu-check` call it); rendering is
`bench.report.probe_markdown`.
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

from bench.report import count_text, probe_markdown, size_text, write_section
from flux2_serving.contract.cli_help import HelpFormatter
from flux2_serving.modeling.checkpoint import random_module

torch = None  # imported by _load_torch() once the arguments are parsed: --help answers without it
DTYPE_NAMES = ("bf16", "fp16", "fp32")


def _load_torch():
    global torch
    import torch as module  # heavy: only once the arguments are parsed (--help answers without it)

    torch = module
    return module

# Token shapes per size: text length, reference and output latent grid side (pixels / 16).
SHAPES = {
    "9b": dict(text_len=512, ref_grid=64, img_grid=64),  # 1024x1024 references and output
    "tiny": dict(text_len=8, ref_grid=4, img_grid=4),  # 16 tokens per reference / image
    "bench": dict(text_len=8, ref_grid=4, img_grid=4),  # make bench's width; it sets the token counts
}
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


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().float().cpu() - b.detach().float().cpu()).abs().max().item()


def step_inputs(config, shape: dict, refs: int, dtype, device, seed: int = 0) -> dict:
    """Random inputs of one transformer step in diffusers' layout (as Flux2KleinKVPipeline builds them): prompt
    embeddings of `shape["text_len"]` tokens, latents on an `img_grid` grid, `refs` references on `ref_grid`
    grids, their position ids, and the timesteps of step 0 (sigma 1.0) and of a later step (0.75).
    `config`: the transformer's. Needs `_load_torch()` first."""
    from diffusers import Flux2KleinKVPipeline as P  # heavy: not at the top, so --help answers without it

    g_img, g_ref, length = shape["img_grid"], shape["ref_grid"], shape["text_len"]
    gen = torch.Generator(device="cpu").manual_seed(seed + 1 + refs)

    def randn(*size):
        return torch.randn(*size, generator=gen).to(device=device, dtype=dtype)

    prompt_embeds = randn(1, length, config.joint_attention_dim)
    latents = randn(1, g_img * g_img, config.in_channels)
    txt_ids = P._prepare_text_ids(prompt_embeds.cpu())[0].to(device)
    img_ids = P._prepare_latent_ids(torch.empty(1, 1, g_img, g_img))[0].to(device)
    if refs:
        ref_latents = randn(1, refs * g_ref * g_ref, config.in_channels)
        ref_ids = P._prepare_image_ids([torch.empty(1, 1, g_ref, g_ref)] * refs)[0].to(device)
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
        sigma0=torch.full((1,), 1.0, dtype=dtype, device=device),
        sigma=torch.full((1,), 0.75, dtype=dtype, device=device),
    )


def cached_step(cached, x: dict, grid: int, ref_kv, latents=None, sigma=None):
    """One step of our TransformerCached `cached` on step_inputs' tensors `x` (or the given `latents`
    [B, grid*grid, C] and `sigma`), in the graph's layout: latent grid [B, g, g, C], ids on the grid, one K/V
    tensor per block (`ref_kv`). Returns the prediction as [B, grid*grid, C]."""
    latents = x["latents"] if latents is None else latents
    sigma = x["sigma"] if sigma is None else sigma
    b = latents.shape[0]
    out = cached(latents.reshape(b, grid, grid, -1), x["prompt_embeds"], sigma.expand(b),
                 x["img_ids"].reshape(grid, grid, 4), x["txt_ids"], *ref_kv)
    return out.reshape(b, grid * grid, -1)


class Probe:
    def __init__(self, args, argv):
        self.args = args
        self.argv = argv
        self.start = time.perf_counter()
        self.dev = Device(torch.device(args.device))
        from flux2_serving.modeling.loading import DTYPES  # imports torch at its top: here, after _load_torch

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
        return step_inputs(self.transformer.config, self.shape, refs, self.dtype, self.dev.device, self.args.seed)

    def kv_layers(self) -> list[int]:
        """First/last double and first/last single block (all 4 layers at the tiny size)."""
        nd = len(self.transformer.transformer_blocks)
        nl = nd + len(self.transformer.single_transformer_blocks)
        return sorted({0, nd - 1, nd, nl - 1})

    # ---------------------------------------------------------------- stages
    def run_refs(self, refs: int) -> None:
        # export.components imports torch and diffusers at its top: here, so --help answers without them
        from flux2_serving.modeling.components import TransformerCached, TransformerPrefill

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
            return cached_step(cached, x, self.shape["img_grid"], ref_kv)

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
        import diffusers  # heavy: not at the top, so --help answers without it

        args = self.args
        self.log(f"device {self.dev.name}; torch {torch.__version__}, diffusers {diffusers.__version__}")
        self.log(f"building Flux2Transformer2DModel ({args.size}, {args.dtype}, random weights) on {args.device}")
        t0 = time.perf_counter()
        self.transformer = random_module("transformer", args.size, self.dtype, self.dev.device)
        self.dev.sync()
        build_s = time.perf_counter() - t0
        params = sum(p.numel() for p in self.transformer.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in self.transformer.parameters())
        weight_bytes += sum(b.numel() * b.element_size() for b in self.transformer.buffers())
        self.log(f"built in {build_s:.1f} s: {count_text(params)} parameters, {size_text(weight_bytes)} of weights")

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


def _refs(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError("expected a comma-separated list of reference counts >= 0, e.g. 0,1,4")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m bench.gpu_probe", description=HELP,
                                formatter_class=HelpFormatter)
    p.add_argument("--size", choices=sorted(SHAPES), default="9b",
                   help="transformer dims: klein 9B (default) or the project's tiny test dims (CPU, seconds)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="device (default: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None,
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
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random inputs (the weights come from checkpoint.random_module's fixed seeds)")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="skip the stages that would start after this many seconds (default 420)")
    p.add_argument("--json", type=Path, default=None, help="write the results as JSON to this path")
    p.add_argument("--markdown", type=Path, default=None, help="write the '## GPU probe' section to this path")
    p.add_argument("--benchmarks", action="store_true",
                   help="also replace the GPU probe section of BENCHMARKS.md with this run's")
    args = p.parse_args(argv)
    _load_torch()
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
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


def run(**options) -> dict:
    """The probe in-process: keyword options as the CLI's (size="bench", device="cpu", refs="1,4",
    text_len=128, ...); returns the result dict (measurements, checks, environment)."""
    argv = [arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    return Probe(parse_args(argv), argv).run()


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    probe = Probe(args, argv)
    result = probe.run()
    md = probe_markdown(result)
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
        probe.log(f"wrote {write_section('gpu_probe', md)}")
    failed = [m["name"] for m in result["measurements"] if "error" in m]
    if failed:
        probe.log(f"{len(failed)} measurement(s) not taken: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
