"""Generated config.pbtxt files parse as Triton ModelConfig protobufs and say what we mean."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.specs import spec_from_manifest
from flux2_serving.serving import memory_plan
from flux2_serving.serving.memory_plan import ModelSize
from flux2_serving.serving.repository import assemble, bls_config, cache_config
from flux2_serving.serving.triton_config import COMPONENT_QUEUE, component_config


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime", "torch"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_component_configs_parse(request, backend, dtype):
    onnx_dir = request.getfixturevalue(f"onnx_{dtype}")
    manifest = json.loads((onnx_dir / "manifest.json").read_text())
    for name, entry in manifest["graphs"].items():
        config = parse(component_config(spec_from_manifest(name, entry), dtype, backend))
        assert config.name == name
        assert [i.name for i in config.input] == [t["name"] for t in entry["inputs"]]
        float_type = model_config_pb2.TYPE_BF16 if dtype == "bf16" else model_config_pb2.TYPE_FP32
        assert {i.data_type for i in config.input} <= {float_type, model_config_pb2.TYPE_INT64}
        # Only the text encoder batches across requests (every tensor leads with batch, engine batch 4); the
        # cached step's K/V has no batch axis and the VAE decoder decodes one image per call.
        batched = name == "text_encoder"
        assert config.max_batch_size == (4 if batched else 0)
        assert (config.dynamic_batching.max_queue_delay_microseconds > 0) == batched
        # Every component's queue is bounded (each one is reachable by direct callers over gRPC).
        assert config.dynamic_batching.default_queue_policy.max_queue_size == COMPONENT_QUEUE
        if name == "text_encoder":  # the envelope fixes the text length: Triton itself refuses others
            assert [list(i.dims) for i in config.input] == [[512], [512]]
        if backend == "tensorrt":
            assert config.platform == "tensorrt_plan"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
            assert list(config.instance_group[0].gpus) == [0]  # pinned: not one copy per visible GPU
            # Triton runs only profile 0 unless the group lists them: the VAE encoder's two area-bounded boxes.
            assert list(config.instance_group[0].profile) == (["0", "1"] if name == "vae_encoder" else [])
        else:
            assert config.backend == "python"


def test_bls_config_is_the_public_interface():
    config = parse(bls_config("cuda:0", 3))
    inputs = {i.name: i for i in config.input}
    assert list(inputs) == ["prompt", "image", "height", "width", "seed", "num_images_per_prompt",
                            "num_inference_steps", "reuse_reference_cache"]
    assert inputs["reuse_reference_cache"].data_type == model_config_pb2.TYPE_BOOL
    assert not inputs["prompt"].optional and all(inputs[n].optional for n in list(inputs)[1:])
    assert inputs["prompt"].data_type == model_config_pb2.TYPE_STRING and list(inputs["image"].dims) == [-1]
    assert inputs["seed"].data_type == model_config_pb2.TYPE_INT64
    outputs = {o.name: o for o in config.output}
    assert list(outputs["images"].dims) == [-1, -1, -1, 3]
    assert outputs["images"].data_type == model_config_pb2.TYPE_UINT8
    assert outputs["png"].data_type == model_config_pb2.TYPE_STRING
    assert config.max_batch_size == 0 and config.instance_group[0].count == 3
    assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert config.parameters["max_sequence_length"].string_value == "512"
    limits = DEFAULT_ENVELOPE.request_limits()  # the BLS's limits are the envelope's, written once
    assert {k: int(config.parameters[k].string_value) for k in limits} == limits


def test_bls_queue_is_bounded_with_a_probe_level():
    config = parse(bls_config("cpu", 2, replace(DEFAULT_ENVELOPE, bls_max_queue=5, bls_queue_timeout_s=7)))
    batcher = config.dynamic_batching
    assert batcher.priority_levels == 2 and batcher.default_priority_level == 2
    policy = batcher.default_queue_policy
    assert policy.max_queue_size == 5 and policy.default_timeout_microseconds == 7_000_000
    assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT and policy.allow_timeout_override
    assert batcher.priority_queue_policy[1].max_queue_size > 0  # the watchdog's probes wait apart


def test_cache_config_is_one_instance_holding_the_budget():
    config = parse(cache_config("cuda:0", "bf16", {"kv_layers": 32, "heads": 32, "head_dim": 128}))
    assert config.instance_group[0].count == 1  # one cache for every BLS instance
    assert int(config.parameters["reference_cache_bytes"].string_value) == 4 * 2**30
    inputs, outputs = {i.name: i for i in config.input}, {o.name: o for o in config.output}
    assert list(inputs) == ["key"] + [f"ref_kv_{i:02d}" for i in range(32)]
    assert list(outputs) == ["hit"] + [f"cached_kv_{i:02d}" for i in range(32)]
    assert inputs["ref_kv_31"].optional and inputs["ref_kv_31"].data_type == model_config_pb2.TYPE_BF16
    assert list(inputs["ref_kv_00"].dims) == [2, -1, 32, 128]  # Triton refuses other heads / head sizes
    assert int(config.parameters["max_reference_tokens"].string_value) == 4096  # what one store may hold
    assert outputs["cached_kv_00"].data_type == model_config_pb2.TYPE_BF16
    assert outputs["hit"].data_type == model_config_pb2.TYPE_BOOL


def test_assembled_repository_configs_parse(tmp_path, onnx_fp32, tiny_checkpoint):
    repo = assemble(onnx_fp32, tiny_checkpoint, tmp_path / "repo")
    names = sorted(p.parent.name for p in repo.glob("*/config.pbtxt"))
    assert names == sorted(["flux2_klein_kv", "text_encoder", "vae_encoder", "transformer_prefill",
                            "transformer_cached", "vae_decoder", "reference_kv_cache"])
    for path in repo.glob("*/config.pbtxt"):
        assert parse(path.read_text()).name == path.parent.name
    assert (repo / "text_encoder" / "1" / "model.onnx").exists()
    assert (repo / "flux2_klein_kv" / "1" / "tokenizer" / "tokenizer.json").exists()


# ------------------------------------------------------------------ the repository serves the exported model


def test_repository_takes_tokenizer_and_scheduler_from_the_exported_model(tmp_path, onnx_fp32, tiny_checkpoint):
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    assert Path(manifest["model"]).resolve() == Path(tiny_checkpoint).resolve()  # recorded by the export
    repo = assemble(onnx_fp32, out=tmp_path / "repo")  # no checkpoint given: the manifest's model
    for part in ("tokenizer/tokenizer.json", "scheduler/scheduler_config.json"):
        assert (repo / "flux2_klein_kv" / "1" / part).read_bytes() == (Path(tiny_checkpoint) / part).read_bytes()
    # Another model's folder (here: a copy of the tiny one elsewhere) is refused, not silently mixed in.
    other = tmp_path / "other_model"
    shutil.copytree(tiny_checkpoint, other, ignore=shutil.ignore_patterns("*.safetensors"))
    with pytest.raises(SystemExit, match="exported from"):
        assemble(onnx_fp32, str(other), tmp_path / "repo2")
    with pytest.raises(SystemExit, match="exported from"):
        assemble(onnx_fp32, "black-forest-labs/FLUX.2-klein-9b-kv", tmp_path / "repo3")


def test_tensorrt_repository_puts_the_bls_on_the_gpu_by_default(tmp_path, onnx_bf16):
    engines = tmp_path / "engines"
    engines.mkdir()
    manifest = json.loads((onnx_bf16 / "manifest.json").read_text())
    for name in manifest["graphs"]:
        (engines / f"{name}.trt10.5.0.sm90.plan").write_bytes(b"not a real plan: only copied")
    repo = assemble(onnx_bf16, out=tmp_path / "repo", backend="tensorrt", engines_dir=engines)
    for model in ("flux2_klein_kv", "reference_kv_cache"):
        config = parse((repo / model / "config.pbtxt").read_text())
        assert config.parameters["device"].string_value == "cuda:0"
        assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    repo = assemble(onnx_bf16, out=tmp_path / "repo", backend="tensorrt", engines_dir=engines, device="cuda:1")
    assert list(parse((repo / "transformer_cached" / "config.pbtxt").read_text()).instance_group[0].gpus) == [1]


def test_make_never_reexports_over_another_models_export(tmp_path):
    """The manifest rule re-exports only the tiny model; an older 9B export is left alone."""
    onnx = tmp_path / "onnx"
    onnx.mkdir()
    manifest = onnx / "manifest.json"
    manifest.write_text(json.dumps({"model": "black-forest-labs/FLUX.2-klein-9b-kv", "dtype": "bf16"}))
    os.utime(manifest, (0, 0))  # older than every export source
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(["make", "-C", str(root), f"ONNX={onnx}", str(manifest)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "note:" in result.stdout and "exporting" not in result.stdout
    assert json.loads(manifest.read_text())["model"] == "black-forest-labs/FLUX.2-klein-9b-kv"


def test_a_dynamic_tensorrt_engine_never_gets_two_instances_by_accident(onnx_fp32):
    """tensorrt_backend shares an engine between instances only when no tensor is dynamic: two instances
    of the 17 GiB cached step would hold its weights twice. The config refuses; the plan counts copies."""
    manifest = json.loads((onnx_fp32 / "manifest.json").read_text())
    spec = spec_from_manifest("transformer_cached", manifest["graphs"]["transformer_cached"])
    parse(component_config(spec, "bf16", "tensorrt", instances=1))
    with pytest.raises(ValueError, match="dynamic shapes would each deserialize their own copy"):
        component_config(spec, "bf16", "tensorrt", instances=2)
    parse(component_config(spec, "fp32", "onnxruntime", instances=2))  # Python-backend runners: not engines


def test_the_memory_plan_counts_weights_once_per_instance():
    dims = {"text_hidden": 32, "heads": 2, "head_dim": 16, "kv_layers": 2, "in_channels": 128}
    size = ModelSize(dims, dict.fromkeys(["text_encoder", "vae_encoder", "transformer_prefill", "transformer_cached",
                                          "vae_decoder"], 1000), 96, 64, 32)
    one, two = (memory_plan.plan(size, "bf16", DEFAULT_ENVELOPE, 1, instances=n) for n in (1, 2))
    weights = [[b for what, _, b in rows if what == "weights"] for rows in (one, two)]
    assert weights[1] == [2 * b for b in weights[0]]
