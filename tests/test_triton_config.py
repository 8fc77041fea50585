"""Generated config.pbtxt files parse as Triton ModelConfig protobufs and say what we mean."""

from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.specs import spec_from_manifest
from export.repository import assemble, bls_config, cache_config
from export.triton_config import component_config


def parse(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


@pytest.mark.parametrize("backend", ["tensorrt", "onnxruntime"])
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
        # Every tensor leads with batch and the profile goes up to 4: batched across requests, on both backends.
        batched = name in ("text_encoder", "transformer_cached", "vae_decoder")
        assert config.max_batch_size == (4 if batched else 0)
        assert config.HasField("dynamic_batching") == batched
        if backend == "tensorrt":
            assert config.platform == "tensorrt_plan"
            assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
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
    assert list(outputs["images"].dims) == [-1, -1, -1, 3] and outputs["images"].data_type == model_config_pb2.TYPE_UINT8
    assert outputs["png"].data_type == model_config_pb2.TYPE_STRING
    assert config.max_batch_size == 0 and config.instance_group[0].count == 3
    assert config.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert config.parameters["max_sequence_length"].string_value == "512"


def test_cache_config_is_one_instance_holding_the_budget():
    config = parse(cache_config("cuda:0", "bf16"))
    assert config.instance_group[0].count == 1  # one cache for every BLS instance
    assert int(config.parameters["reference_cache_bytes"].string_value) == 8 * 2**30
    inputs, outputs = {i.name: i for i in config.input}, {o.name: o for o in config.output}
    assert inputs["ref_kv"].optional and inputs["ref_kv"].data_type == model_config_pb2.TYPE_BF16
    assert outputs["cached_kv"].data_type == model_config_pb2.TYPE_BF16
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
