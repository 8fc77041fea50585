"""python -m flux2_serving.serving.repository: assemble a servable Triton model repository.

  OUT/flux2_klein_kv/       the public BLS model: its committed folder (model_repository/, a
                            model.py that imports flux2_serving.models.bls), the tokenizer,
                            scheduler config and export manifest
  OUT/<component>/          text_encoder, vae_encoder, transformer_prefill, transformer_cached,
                            vae_decoder: config.pbtxt from the declared I/O spec, and
                            1/model.plan (--backend tensorrt), or a Python-backend model that runs
                            1/model.onnx in onnxruntime (--backend onnxruntime) or the exported
                            wrapper module in PyTorch (--backend torch, from the manifest's model);
                            with --backend tensorrt and a --tier that streams engines (32gb-fp8),
                            those engines' 1/model.plan in the Python-backend component runner
                            (runtime tensorrt_streamed: TensorRT weight streaming, which
                            tensorrt_backend cannot do), the others in tensorrt_backend
  OUT/reference_kv_cache/   one instance holding reference K/V shared by all BLS instances
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

from flux2_serving import CHECKOUT
from flux2_serving.contract import interface
from flux2_serving.contract.cli_help import command_parser
from flux2_serving.contract.envelope import DEFAULT_ENVELOPE, GPU_BLS_INSTANCES, ServingEnvelope
from flux2_serving.contract.manifest import Manifest
from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.contract.manifest import write as write_manifest
from flux2_serving.contract.names import BLS_MODEL as BLS
from flux2_serving.contract.names import CACHE_MODEL as CACHE
from flux2_serving.contract.tiers import BY_NAME as TIERS
from flux2_serving.models.trt_runtime import check_budget  # light: tensorrt and torch only in the runtime itself
from flux2_serving.serving import memory_plan
from flux2_serving.serving.memory_plan import bls_transfer_bytes

from . import triton_config
from .triton_config import BACKENDS, component_config, cpu_only

# The committed model folders: each Python-backend model's model.py imports its implementation
# from the installed package by name (flux2_serving.models); nothing is copied from the package.
SOURCES = CHECKOUT / "model_repository"

def cache_config(device: str, dtype: str, dims: dict, envelope: ServingEnvelope = DEFAULT_ENVELOPE) -> str:
    """config.pbtxt of the shared reference K/V cache (triton_config.cache_config); `dims` the manifest's."""
    return triton_config.cache_config(CACHE, device, dtype, dims, envelope.reference_cache_bytes, envelope)


def bls_config(device: str, instances: int, envelope: ServingEnvelope = DEFAULT_ENVELOPE,
               parameters: dict | None = None) -> str:
    """config.pbtxt of the public BLS model, from the declaration of its interface."""
    return triton_config.bls_config(BLS, interface, device, instances, envelope, parameters)


def _find_engine(engines_dir: Path, component: str) -> Path:
    plans = sorted(engines_dir.glob(f"{component}.trt*.plan"))
    if len(plans) != 1:
        raise SystemExit(f"error: expected one {component}.trt*.plan in {engines_dir}, found {len(plans)}")
    return plans[0]


MARKER = ".flux2_repository"  # written into every repository this tool assembles


def _replaceable(out: Path) -> None:
    """Refuse to delete a folder this tool did not make (a wrong --out must not wipe anything)."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).exists())):
        raise SystemExit(f"error: --out {out} exists and was not written by python -m flux2_serving.serving.repository "
                         f"(no {MARKER} in it): choose another --out, or remove it yourself")


def default_bls_instances(device: str) -> int:
    """1 on a GPU (the GPU memory plan: each instance holds a request's K/V twice while a step runs),
    2 on the CPU (requests overlap)."""
    return GPU_BLS_INSTANCES if device.startswith("cuda") else 2


def default_device(backend: str) -> str:
    """Where the BLS computes: next to the engines for TensorRT (outputs stay on the GPU), else the CPU."""
    return "cuda:0" if backend == "tensorrt" else "cpu"


def assemble(onnx_dir, checkpoint=None, out="build/model_repository", backend="onnxruntime", engines_dir=None,
             device=None, bls_instances=None, threads=1, envelope: ServingEnvelope = DEFAULT_ENVELOPE,
             bls_parameters: dict | None = None, cache_device: str | None = None, streamed: tuple = (),
             stream_budget_bytes: int = 0) -> Path:
    """Write the repository to `out`. Tokenizer and scheduler come from the model recorded in the
    export's manifest; `checkpoint`, if given, must be that model (a local copy of it is fine).
    `envelope` sets every limit, the text length, the BLS's queue and the cache budget;
    `bls_parameters` override the BLS's config parameters (triton_config.BLS_PARAMETERS); `cache_device`:
    where the reference K/V cache holds its entries (default: the BLS's device; "cpu": host memory).
    `streamed` (backend tensorrt only; a tier's `streamed`): components whose plans run in the component
    runner with TensorRT weight streaming, keeping `stream_budget_bytes` of their weights on the GPU."""
    onnx_dir, out = Path(onnx_dir), Path(out)
    if streamed and backend != "tensorrt":
        raise ValueError(f"streamed engines ({', '.join(streamed)}) need backend tensorrt, not {backend}")
    device = device or default_device(backend)
    bls_instances = bls_instances or default_bls_instances(device)
    try:
        manifest = read_manifest(onnx_dir)
    except FileNotFoundError as exc:
        raise SystemExit(f"error: {exc}") from None
    source = _tokenizer_source(manifest, checkpoint)
    engines = {name: _find_engine(Path(engines_dir), name) for name in manifest.paths} if backend == "tensorrt" else {}
    records = memory_plan.built_records(engines_dir) if streamed else {}
    for name in streamed:
        if name in engines:
            _check_streamable(name, engines[name], records.get(name), stream_budget_bytes)
    gpu = torch_device_index(device)
    _replaceable(out)  # every input was checked above: only now may the old repository go
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(f"assembled by python -m flux2_serving.serving.repository from {onnx_dir.resolve()}\n")
    for name, path in manifest.paths.items():
        version = out / name / "1"
        version.mkdir(parents=True)
        params, component_backend = {}, backend
        if backend == "tensorrt":
            _link_or_copy(engines[name], version / "model.plan")
            if name in streamed:  # the component runner's TensorRT runtime, which can stream weights
                _model_folder(name, out)
                component_backend = "tensorrt_streamed"
                params = {"runtime": "tensorrt_streamed", "stream_budget_bytes": stream_budget_bytes,
                          "device": f"cuda:{gpu}", "FORCE_CPU_ONLY_INPUT_TENSORS": "no"}
        elif backend == "onnxruntime":
            for graph_file in (onnx_dir / path).parent.glob("model.onnx*"):
                shutil.copy(graph_file, version / graph_file.name)
            _model_folder(name, out)
            params = {"runtime": "onnxruntime", "intra_op_threads": threads}
        else:  # torch: the wrapper modules themselves, loaded from the exported model
            _model_folder(name, out)
            weights = manifest.model if manifest.model.startswith("random:") else _local_checkpoint(source, True)
            params = {"runtime": "torch", "checkpoint": weights, "dtype": manifest.dtype, "device": device,
                      "FORCE_CPU_ONLY_INPUT_TENSORS": cpu_only(device)}
            if name in manifest.quantized:  # FP8 linear layers (models/fp8_linear.py: dynamic input scales)
                params["quantize"] = manifest.quantization
        config = component_config(manifest.specs[name], manifest.dtype, component_backend, envelope=envelope, gpu=gpu,
                                  params=params, vocab_size=manifest.dims.get("vocab_size", 0))
        (out / name / "config.pbtxt").write_text(config)

    bls = out / BLS / "1"
    _model_folder(BLS, out)
    local = Path(_local_checkpoint(source))
    for part in ("tokenizer", "scheduler"):
        shutil.copytree(local / part, bls / part)
    write_manifest(bls, manifest)  # the BLS reads its dims and dtype
    parameters = dict(bls_parameters or {})
    if device.startswith("cuda"):
        # flux2_serving.server.launch passes it as --cuda-memory-pool-byte-size (the plan's BLS row)
        parameters.setdefault("cuda_memory_pool_byte_size",
                              bls_instances * bls_transfer_bytes(manifest.dims, manifest.dtype, envelope))
    (out / BLS / "config.pbtxt").write_text(bls_config(device, bls_instances, envelope, parameters))
    _model_folder(CACHE, out)
    (out / CACHE / "config.pbtxt").write_text(
        cache_config(cache_device or device, manifest.dtype, manifest.dims, envelope))
    return out


def _check_streamable(name: str, plan: Path, record: dict | None, budget: int) -> None:
    """Refuse, before anything is written, a plan that its build record (build_engines' build_record.json,
    when it describes this very plan) shows cannot stream `budget`: the runner would refuse it at load."""
    if not record or record.get("plan") != plan.name:
        return  # no record of this plan: the component runner checks when it loads it
    try:
        check_budget(name, budget, record.get("streamable_weights_bytes", 0))
    except ValueError as exc:
        raise SystemExit(f"error: {plan}: {exc}") from None


def _model_folder(name: str, out: Path) -> None:
    """A Python-backend model's committed folder (model_repository/NAME: its model.py, which imports
    the model from the installed flux2_serving package)."""
    shutil.copytree(SOURCES / name, out / name, ignore=shutil.ignore_patterns("__pycache__"), dirs_exist_ok=True)


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link a plan into the repository (tens of GB at 9B), copying only across file systems."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy(source, target)


def torch_device_index(device: str) -> int:
    """The GPU index of 'cuda:N' (0 for 'cuda' or 'cpu'): where the TensorRT instances are pinned."""
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") else 0


def _tokenizer_source(manifest: Manifest, checkpoint) -> str:
    """The model whose tokenizer and scheduler the BLS gets: the one the graphs were exported from."""
    recorded = manifest.model
    if checkpoint is None:
        if not recorded:
            raise SystemExit("error: the manifest records no model; pass --checkpoint (the model that was exported)")
        return recorded
    if recorded and not _same_model(checkpoint, recorded):
        raise SystemExit(f"error: the graphs were exported from {recorded}, not {checkpoint}: the tokenizer and "
                         "scheduler must come from the exported model (omit --checkpoint to use it)")
    return checkpoint


def _same_model(given: str, recorded: str) -> bool:
    """True unless `given` is provably another model: two local folders or two hub ids that differ.
    (A local folder for a hub id is taken as a downloaded copy of it.)"""
    given_local, recorded_local = Path(given).is_dir(), Path(recorded).is_dir()
    if given_local and recorded_local:
        return Path(given).resolve() == Path(recorded).resolve()
    if not given_local and not recorded_local:
        return given == recorded
    return given_local


def _local_checkpoint(checkpoint: str, weights: bool = False) -> str:
    """A local directory for `checkpoint`: downloads only the small tokenizer/scheduler files, or
    everything with `weights` (the torch backend loads the components from it)."""
    if Path(checkpoint).is_dir():
        return str(Path(checkpoint).resolve())
    from huggingface_hub import snapshot_download  # heavy (an HTTP stack): only a hub id, not a local folder, needs it

    return snapshot_download(checkpoint, allow_patterns=None if weights else ["tokenizer/*", "scheduler/*"])


def main(argv=None) -> int:
    parser = command_parser("flux2_serving.serving.repository", __doc__)
    parser.add_argument("--onnx-dir", required=True,
                        help="output of `python -m flux2_serving.export` (has manifest.json)")
    parser.add_argument("--model", "--checkpoint", dest="checkpoint", default=None,
                        help="local copy of the exported model (tokenizer, scheduler); default: the model recorded "
                             "in the manifest")
    parser.add_argument("--repository", "--out", dest="out", default="build/model_repository",
                        help="repository folder to write (default %(default)s); replaced only if this tool wrote it")
    parser.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                        help="tensorrt (production, GPU), onnxruntime (CPU, Python backend) or torch (the exported "
                             "modules in PyTorch on --device, Python backend: a GPU host before its engines exist)")
    parser.add_argument("--engines-dir", default="build/engines", help="TensorRT plans (with --backend tensorrt)")
    parser.add_argument("--device", default=None,
                        help="device the BLS and the reference cache compute on: cpu or cuda:N "
                             "(default: cuda:0 with --backend tensorrt, else cpu); TensorRT instances are pinned to it")
    parser.add_argument("--bls-instances", type=int, default=None,
                        help="BLS instances, i.e. requests in flight (default: 1 on a GPU, see the GPU memory plan; "
                             "2 on the CPU)")
    parser.add_argument("--tier", choices=tuple(TIERS), default=None,
                        help="memory tier (contract/tiers.py): its envelope and where the reference cache lives "
                             "(default: the shipped envelope, the 80gb-bf16 tier's)")
    parser.add_argument("--bls-max-queue", type=int, default=None,
                        help="requests that may wait for the BLS; beyond them Triton answers UNAVAILABLE at once")
    parser.add_argument("--bls-queue-timeout", type=float, default=None,
                        metavar="SECONDS", help="longest wait in the BLS's queue (then UNAVAILABLE)")
    parser.add_argument("--reference-cache-bytes", type=int, default=None,
                        help=f"byte budget of the shared reference K/V cache (default: the envelope's, "
                             f"{DEFAULT_ENVELOPE.reference_cache_bytes} = 4 GiB; 0 disables)")
    args = parser.parse_args(argv)
    tier = TIERS[args.tier] if args.tier else None
    overrides = {key: value for key, value in (("reference_cache_bytes", args.reference_cache_bytes),
                                               ("bls_max_queue", args.bls_max_queue),
                                               ("bls_queue_timeout_s", args.bls_queue_timeout)) if value is not None}
    envelope = replace(tier.envelope if tier else DEFAULT_ENVELOPE, **overrides)
    streamed = tier.streamed if tier and args.backend == "tensorrt" else ()
    budget = int(tier.stream_budget_gib * 2**30) if streamed else 0
    try:
        out = assemble(args.onnx_dir, args.checkpoint, args.out, args.backend, args.engines_dir, args.device,
                       args.bls_instances, envelope=envelope,
                       cache_device="cpu" if tier and tier.cache_on_host else None, streamed=streamed,
                       stream_budget_bytes=budget)
    except SystemExit as exc:  # a bad local input: one line, status 2
        if not isinstance(exc.code, str):
            raise
        print(exc.code, file=sys.stderr)
        return 2
    # Notes once the repository is written (a refusal above stays one line).
    if tier and "fp8" in tier.weights.values() and args.backend == "tensorrt" and \
            read_manifest(args.onnx_dir).quantization != "fp8":
        print(f"note: tier {tier.name} expects FP8 engines, built from an FP8 export (export --dtype bf16 "
              f"--quantize fp8); {args.onnx_dir} holds unquantized graphs", file=sys.stderr)
    if streamed:
        print(f"note: tier {tier.name} streams the weights of {', '.join(streamed)} from host memory: they run in "
              f"the Python-backend component runner (runtime tensorrt_streamed, {budget} bytes of each on the GPU; "
              "written to TensorRT's documented API, not run yet)", file=sys.stderr)
    print(f"wrote Triton model repository ({args.backend}) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
