"""TensorRT weight streaming of the engines a memory tier streams (contract/tiers.py: 32gb-fp8 streams the
text encoder and the prefill): the builder flag, the repository that serves them from the component
runner's tensorrt_streamed runtime, and that runtime's checks.

TensorRT is not installable here and there is no GPU: the runtime (models/trt_runtime.py) is written to
TensorRT's documented API and not run. What is checked: its pure helpers (profile choice, budget,
dtypes), its one-line error without TensorRT (through the component runner, on an assembled config),
the assembled repository, and the builder's flags with a stand-in for the TensorRT module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from flux2_serving.contract.envelope import engine_profiles
from flux2_serving.contract.manifest import read as read_manifest
from flux2_serving.contract.specs import graph_specs
from flux2_serving.contract.tiers import BY_NAME
from flux2_serving.export.build_engines import RECORD, build_engine
from flux2_serving.models import trt_runtime
from flux2_serving.models.trt_runtime import (
    MISSING_TENSORRT,
    TORCH_DTYPES,
    TensorRTStreamed,
    check_budget,
    select_profile,
    torch_dtype_name,
)
from flux2_serving.serving.triton_config import component_config
from tests.support import ROOT, modules_imported_by, one_line_error, run_module

TIER = BY_NAME["32gb-fp8"]
STREAMED = ("text_encoder", "transformer_prefill")
BUDGET = 2**30  # the tier's stream_budget_gib
TINY_DIMS = {"text_hidden": 64, "heads": 4, "head_dim": 16, "kv_layers": 4, "in_channels": 128}


def test_the_tier_streams_the_text_encoder_and_the_prefill_with_a_1_gib_budget():
    assert TIER.streamed == STREAMED and int(TIER.stream_budget_gib * 2**30) == BUDGET


# ------------------------------------------------------------------ the runtime's helpers


def _ranges(spec_name: str) -> list[dict]:
    """The engine's profiles as TensorRT reports them to the runtime: {input: (min, max)} per profile."""
    spec = graph_specs(TINY_DIMS)[spec_name]
    profiles = engine_profiles(spec, TIER.envelope)
    return [{name: (lo, hi) for name, (lo, _, hi) in profile.items()} for profile in profiles]


def test_one_profile_takes_the_shapes_within_it_and_names_the_input_outside():
    profiles = _ranges("transformer_prefill")
    assert len(profiles) == 1
    assert select_profile({"ref_latents": (1, 16, 128), "ref_ids": (16, 4)}, profiles) == 0
    assert select_profile({"ref_latents": (1, 2048, 128), "ref_ids": (2048, 4)}, profiles) == 0
    with pytest.raises(ValueError) as info:  # 4096 reference tokens: the 80 GB tier's, not this one's
        select_profile({"ref_latents": (1, 4096, 128), "ref_ids": (4096, 4)}, profiles, "transformer_prefill")
    message = str(info.value)
    assert "\n" not in message and message.startswith("transformer_prefill: input 'ref_latents'")
    assert "[1, 4096, 128]" in message and "profile 0 (min [1, 16, 128], max [1, 2048, 128])" in message
    with pytest.raises(ValueError, match="input 'input_ids' has shape \\[5, 512\\]"):  # engine batch 4
        select_profile({"input_ids": (5, 512), "attention_mask": (5, 512)}, _ranges("text_encoder"))
    with pytest.raises(ValueError, match="shape \\[1, 512, 1\\]"):  # another rank never fits
        select_profile({"input_ids": (1, 512, 1), "attention_mask": (1, 512)}, _ranges("text_encoder"))


def test_several_profiles_the_first_that_holds_every_input():
    profiles = _ranges("vae_encoder")  # landscape, portrait
    assert select_profile({"image": (1, 3, 512, 512)}, profiles) == 0
    assert select_profile({"image": (1, 3, 1024, 2048)}, profiles) == 0
    assert select_profile({"image": (1, 3, 2048, 1024)}, profiles) == 1
    with pytest.raises(ValueError) as info:
        select_profile({"image": (1, 3, 2048, 2048)}, profiles, "vae_encoder")
    assert "optimization profile 0" in str(info.value) and "optimization profile 1" in str(info.value)
    with pytest.raises(ValueError, match="no optimization profile"):
        select_profile({"image": (1, 3, 64, 64)}, [])


def test_the_budget_check_refuses_an_engine_that_cannot_stream_it():
    assert check_budget("text_encoder", BUDGET, 6 * 2**30) == BUDGET
    assert check_budget("text_encoder", 0, 6 * 2**30) == 0  # 0: TensorRT streams the most
    assert check_budget("text_encoder", BUDGET, BUDGET) == BUDGET  # equal: nothing streams, still honoured
    cases = {(BUDGET, 0): "not built for weight streaming (streamable_weights_size 0)",
             (BUDGET + 1, BUDGET): f"stream_budget_bytes {BUDGET + 1} exceeds the engine's streamable weights",
             (-1, BUDGET): "must be >= 0"}
    for (budget, streamable), words in cases.items():
        with pytest.raises(ValueError) as info:
            check_budget("transformer_prefill", budget, streamable)
        assert "\n" not in str(info.value) and str(info.value).startswith("transformer_prefill: ")
        assert words in str(info.value)
    with pytest.raises(ValueError, match="--tier"):  # says how to build one that streams
        check_budget("text_encoder", BUDGET, 0)


class FakeDataType:
    """Stand-in for a tensorrt.DataType member (pybind11 enums have `.name`)."""

    def __init__(self, name):
        self.name = name


def test_io_dtypes_map_to_torch_and_fp8_is_not_an_io_type():
    assert torch_dtype_name(FakeDataType("BF16")) == "bfloat16"
    assert torch_dtype_name(FakeDataType("INT64")) == "int64"
    assert torch_dtype_name("DataType.FLOAT") == "float32"  # str() of the enum member also works
    for name in TORCH_DTYPES.values():
        assert isinstance(getattr(torch, name), torch.dtype)
    with pytest.raises(ValueError, match="FP8 is not an input or output type"):
        torch_dtype_name(FakeDataType("FP8"))


def test_without_tensorrt_the_runtime_says_so_in_one_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails, whether or not it is installed
    with pytest.raises(RuntimeError) as info:
        TensorRTStreamed({"model_name": "text_encoder", "model_repository": "/nowhere", "model_version": "1"},
                         {"stream_budget_bytes": str(BUDGET)}, ["prompt_embeds"])
    message = str(info.value)
    assert message.startswith(MISSING_TENSORRT) and "\n" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__  # no chained traceback


def test_the_runtime_module_imports_neither_tensorrt_nor_torch():
    assert modules_imported_by("flux2_serving.models.trt_runtime",
                               ("tensorrt", "torch", "triton_python_backend_utils")) == []
    assert "NOT RUN" in trt_runtime.__doc__ and "not run" in TensorRTStreamed.__doc__


# ------------------------------------------------------------------ the repository


def _config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _engines(tmp_path: Path, onnx_dir: Path) -> Path:
    engines = tmp_path / "engines"
    engines.mkdir()
    for name in json.loads((onnx_dir / "manifest.json").read_text())["graphs"]:
        (engines / f"{name}.trt10.13.3.sm120.plan").write_bytes(b"not a real plan: only linked")
    return engines


def _assemble(onnx_dir: Path, engines: Path, out: Path, *extra):
    return run_module("flux2_serving.serving.repository", "--onnx-dir", str(onnx_dir), "--repository", str(out),
                      "--backend", "tensorrt", "--engines-dir", str(engines), "--tier", TIER.name, *extra)


@pytest.fixture(scope="module")
def streamed_repo(onnx_bf16, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("streamed")
    engines = _engines(tmp, onnx_bf16)
    result = _assemble(onnx_bf16, engines, tmp / "repo")
    assert result.returncode == 0, result.stderr
    return tmp / "repo", engines, result


def test_tensorrt_repository_of_the_tier_streams_two_engines_from_the_component_runner(streamed_repo, onnx_bf16):
    repo, engines, result = streamed_repo
    assert "tensorrt_streamed" in result.stderr and "not run yet" in result.stderr  # says so as it assembles
    manifest = read_manifest(onnx_bf16)
    for name in manifest.paths:
        config = _config(repo / name / "config.pbtxt")
        plan = repo / name / "1" / "model.plan"
        assert plan.read_bytes() == b"not a real plan: only linked"  # the plan, linked as for tensorrt_backend
        assert os.path.samefile(plan, next(engines.glob(f"{name}.trt*.plan")))
        # The I/O, batch and queue are the engine's config's: the BLS cannot tell the two apart.
        engine = _config_text(component_config(manifest.specs[name], manifest.dtype, "tensorrt",
                                               envelope=TIER.envelope))
        assert list(config.input) == list(engine.input) and list(config.output) == list(engine.output)
        assert config.max_batch_size == engine.max_batch_size
        assert config.dynamic_batching == engine.dynamic_batching
        if name not in STREAMED:
            assert config.platform == "tensorrt_plan" and not config.backend
            assert not (repo / name / "1" / "model.py").exists()
            continue
        assert config.backend == "python" and not config.platform
        params = {key: value.string_value for key, value in config.parameters.items()}
        assert params["runtime"] == "tensorrt_streamed"
        assert int(params["stream_budget_bytes"]) == BUDGET
        assert params["device"] == "cuda:0" and params["FORCE_CPU_ONLY_INPUT_TENSORS"] == "no"
        rules = json.loads(params["input_rules"])  # the per-request checks every runner-served component gets
        assert set(rules["dims"]) == {t.name for t in manifest.specs[name].inputs}
        assert config.instance_group[0].count == 1  # one copy of the weights in host memory
        assert "component_runner" in (repo / name / "1" / "model.py").read_text()
    prefill = json.loads(_config(repo / "transformer_prefill" / "config.pbtxt").parameters["input_rules"].string_value)
    assert prefill["ranges"]["n_ref"][1] == 2048  # the tier's envelope: the engine's single profile


def _config_text(text: str) -> model_config_pb2.ModelConfig:
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def test_the_streamed_engines_run_on_the_engines_gpu(onnx_bf16, tmp_path):
    engines = _engines(tmp_path, onnx_bf16)
    result = _assemble(onnx_bf16, engines, tmp_path / "repo", "--device", "cuda:1")
    assert result.returncode == 0, result.stderr
    config = _config(tmp_path / "repo" / "text_encoder" / "config.pbtxt")
    assert config.parameters["device"].string_value == "cuda:1"
    assert list(_config(tmp_path / "repo" / "vae_decoder" / "config.pbtxt").instance_group[0].gpus) == [1]


def test_without_plans_it_fails_as_the_tensorrt_backend_does(onnx_bf16, tmp_path):
    result = _assemble(onnx_bf16, tmp_path / "no_engines", tmp_path / "repo")
    one_line_error(result, 2, "expected one text_encoder.trt*.plan")
    assert not (tmp_path / "repo").exists()


def test_a_plan_recorded_without_streamable_weights_is_refused_before_anything_is_written(onnx_bf16, tmp_path):
    engines = _engines(tmp_path, onnx_bf16)
    plan = next(engines.glob("transformer_prefill.trt*.plan")).name
    record = {"plan": plan, "streamable_weights_bytes": 0, "device_memory_bytes": 0}
    (engines / RECORD).write_text(json.dumps({"transformer_prefill": record}))
    result = _assemble(onnx_bf16, engines, tmp_path / "repo")
    one_line_error(result, 2, plan, "not built for weight streaming")
    assert not (tmp_path / "repo").exists()
    # A record of streamable weights above the budget is fine; one of another plan says nothing of this one.
    (engines / RECORD).write_text(json.dumps({"transformer_prefill": {**record, "streamable_weights_bytes": 5 * BUDGET},
                                              "text_encoder": {**record, "plan": "older.plan"}}))
    result = _assemble(onnx_bf16, engines, tmp_path / "repo")
    assert result.returncode == 0, result.stderr


def test_the_component_runner_loads_the_assembled_config_and_says_tensorrt_is_missing(streamed_repo):
    """The runner as Triton starts it (a stand-in for triton_python_backend_utils, the config as JSON):
    runtime tensorrt_streamed is picked and, without TensorRT, fails to load in one line."""
    repo, _, _ = streamed_repo
    config = json_format.MessageToDict(_config(repo / "text_encoder" / "config.pbtxt"),
                                       preserving_proto_field_name=True)
    args = {"model_config": json.dumps(config), "model_name": "text_encoder",
            "model_repository": str(repo / "text_encoder"), "model_version": "1"}
    code = ("import json, sys, types; sys.modules['triton_python_backend_utils'] = types.ModuleType('pb'); "
            "sys.modules['tensorrt'] = None; "
            "from flux2_serving.models.component_runner import RUNTIMES, TritonPythonModel; "
            "from flux2_serving.models.trt_runtime import TensorRTStreamed; "
            "assert RUNTIMES['tensorrt_streamed'] is TensorRTStreamed; "
            f"TritonPythonModel().initialize(json.loads({json.dumps(args)!r}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"RuntimeError: {MISSING_TENSORRT}: import of tensorrt halted; None in sys.modules", result.stderr


def test_other_backends_ignore_streaming_and_assemble_refuses_it_outside_tensorrt(onnx_fp32, tiny_checkpoint,
                                                                                   tmp_path):
    from flux2_serving.serving.repository import assemble

    with pytest.raises(ValueError, match="need backend tensorrt"):
        assemble(onnx_fp32, tiny_checkpoint, tmp_path / "repo", backend="onnxruntime", streamed=STREAMED)
    result = run_module("flux2_serving.serving.repository", "--onnx-dir", str(onnx_fp32), "--repository",
                        str(tmp_path / "ort"), "--tier", TIER.name)
    assert result.returncode == 0, result.stderr
    config = _config(tmp_path / "ort" / "text_encoder" / "config.pbtxt")
    assert config.parameters["runtime"].string_value == "onnxruntime"


# ------------------------------------------------------------------ the builder


def test_dry_run_names_the_engines_built_for_weight_streaming(onnx_bf16):
    result = run_module("flux2_serving.export.build_engines", "--onnx-dir", str(onnx_bf16), "--dry-run",
                        "--tier", TIER.name)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"weight streaming (tier {TIER.name}): text_encoder, transformer_prefill" in out
    would = {line.split()[2].rsplit("/", 1)[1].split(".")[0]: line for line in out.splitlines()
             if line.startswith("would build")}
    assert len(would) == 5
    for name, line in would.items():
        assert ("for weight streaming" in line) == (name in STREAMED), line
    plain = run_module("flux2_serving.export.build_engines", "--onnx-dir", str(onnx_bf16), "--dry-run")
    assert plain.returncode == 0 and "weight streaming" not in plain.stdout  # the 80 GB plan streams nothing


class FakeTensorRT:
    """Stand-in for the tensorrt module: what build_engine calls, recording the network flags and builder flags."""

    __version__ = "10.13.3"

    def __init__(self, streamable: int):
        self.network_flags, self.builder_flags, self.streamable, self.events = [], [], streamable, []
        fake = self

        class Freed:  # what the build holds (parser, network): says when it is released
            def __init__(self, what):
                self.what = what

            def __del__(self):
                fake.events.append(f"{self.what} released")

        class Enum:
            def __init__(self, **members):
                self.__dict__.update(members)

        self.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=5)
        self.BuilderFlag = Enum(WEIGHT_STREAMING="WEIGHT_STREAMING")
        self.ProfilingVerbosity = Enum(DETAILED="DETAILED")
        self.LayerInformationFormat = Enum(JSON="JSON")
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})

        class Config:
            profiling_verbosity = None

            def set_flag(self, flag):
                fake.builder_flags.append(flag)

            def create_timing_cache(self, data):
                return "cache"

            def set_timing_cache(self, cache, ignore_mismatch):
                return True

            def get_timing_cache(self):
                return type("Cache", (), {"serialize": lambda self: b"timing"})()

            def add_optimization_profile(self, profile):
                pass

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                pass

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                fake.network_flags.append(flags)
                return Freed("network")

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return b"plan"

        class Inspector:
            def get_engine_information(self, format):
                return json.dumps({"Layers": []})

        class Engine:
            device_memory_size_v2 = 2**20
            num_optimization_profiles = 1
            streamable_weights_size = streamable

            def create_engine_inspector(self):
                return Inspector()

        self.Builder = Builder
        class Parser(Freed):
            def parse_from_file(self, path):
                return True

        def deserialize(runtime, data):
            fake.events.append("deserialize")
            return Engine()

        self.OnnxParser = lambda network, logger: Parser("parser")
        self.Runtime = lambda logger: type("Runtime", (), {"deserialize_cuda_engine": deserialize})()


@pytest.mark.parametrize("streaming", [True, False])
def test_the_builder_sets_weight_streaming_on_a_strongly_typed_network(tmp_path, streaming):
    trt, lines = FakeTensorRT(streamable=3 * 2**30 if streaming else 0), []
    record = build_engine(trt, tmp_path / "model.onnx", tmp_path / "text_encoder.plan", [{}],
                          tmp_path / "timing.cache", "120", lines.append, weight_streaming=streaming)
    assert trt.network_flags == [1 << 5]  # STRONGLY_TYPED, which weight streaming needs
    assert trt.builder_flags == (["WEIGHT_STREAMING"] if streaming else [])
    assert record["streamable_weights_bytes"] == (3 * 2**30 if streaming else 0)
    assert any("weight streaming: 3.00 GiB of streamable weights" in line for line in lines) == streaming


def test_the_builder_releases_the_parsed_network_before_deserializing_and_records_its_peak(tmp_path):
    """At 9B the parser's weights, the network, the plan and the engine are ~18 GB each: the parser and network go
    before the engine is deserialized, and the build record says the builder's peak resident memory."""
    trt = FakeTensorRT(streamable=0)
    record = build_engine(trt, tmp_path / "model.onnx", tmp_path / "vae_decoder.plan", [{}], tmp_path / "timing.cache",
                          "90", lambda line: None)
    assert trt.events == ["parser released", "network released", "deserialize"], trt.events
    assert 2**20 < record["builder_peak_rss_bytes"] < 2**40  # this process's VmHWM: at least a MiB, under a TiB


def test_the_builder_warns_when_a_streaming_build_has_nothing_to_stream(tmp_path):
    trt, lines = FakeTensorRT(streamable=0), []
    build_engine(trt, tmp_path / "model.onnx", tmp_path / "text_encoder.plan", [{}], tmp_path / "timing.cache",
                 "120", lines.append, weight_streaming=True)
    assert any("WARNING: none" in line and "tensorrt_streamed runtime will refuse" in line for line in lines)
