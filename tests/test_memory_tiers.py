"""Memory tiers (contract/tiers.py): the plan of each card class, from the 9B model's parameters counted
on the meta device. The FP8 engines and weight streaming are planned, not built: these are plans."""

from __future__ import annotations

import subprocess
import sys

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from flux2_serving.contract.envelope import DEFAULT_ENVELOPE
from flux2_serving.contract.tiers import BY_NAME, FP8_ENGINES, tier_for
from flux2_serving.serving import memory_plan
from tests.support import one_line_error, run_module

GIB = 2**30


@pytest.fixture(scope="module")
def size_9b():
    return memory_plan.model_size(None)


def _free(size, tier) -> float:
    rows = memory_plan.plan(size, "bf16", tier.envelope, memory_plan.GPU_BLS_INSTANCES, tier=tier)
    return 1 - memory_plan.total_bytes(rows) / (tier.gpu_gib * GIB)


def test_each_card_gets_the_tier_made_for_it():
    assert [tier_for(gib).name for gib in (80, 79.2, 48, 47.5, 32, 31.4, 24)] == [
        "80gb-bf16", "48gb-fp8", "48gb-fp8", "32gb-fp8", "32gb-fp8", "32gb-fp8", "32gb-fp8"]


def test_the_80_gb_tier_is_todays_plan(size_9b):
    tier = BY_NAME["80gb-bf16"]
    with_tier = memory_plan.plan(size_9b, "bf16", tier.envelope, 1, tier=tier)
    without = memory_plan.plan(size_9b, "bf16", DEFAULT_ENVELOPE, 1)
    assert [row[2] for row in with_tier] == [row[2] for row in without]


def test_fp8_counts_the_blocks_linear_weights_in_one_byte(size_9b):
    for name in FP8_ENGINES:
        bf16 = memory_plan.weight_bytes(size_9b, name, "bf16")
        fp8 = memory_plan.weight_bytes(size_9b, name, "fp8")
        # Most of each engine is its blocks' linear layers; embeddings (the text encoder's token embedding:
        # 0.6B of its 5.8B), norms and modulation stay bf16.
        assert 0.85 * size_9b.params[name] < size_9b.fp8_params[name] < size_9b.params[name]
        assert fp8 == bf16 - size_9b.fp8_params[name]


@pytest.mark.parametrize("name", ["80gb-bf16", "48gb-fp8", "32gb-fp8"])
def test_every_tier_fits_its_card_with_15_percent_headroom(size_9b, name):
    assert _free(size_9b, BY_NAME[name]) >= 0.15


def test_the_48_gb_tier_needs_fp8_and_the_cache_in_host_memory(size_9b):
    tier = BY_NAME["48gb-fp8"]
    bf16 = memory_plan.plan(size_9b, "bf16", tier.envelope, 1, tier=BY_NAME["80gb-bf16"])
    assert 1 - memory_plan.total_bytes(bf16) / (48 * GIB) < 0  # today's engines do not even fit
    rows = memory_plan.plan(size_9b, "bf16", tier.envelope, 1, tier=tier)
    cache = next(row for row in rows if row[1] == "reference_kv_cache")
    assert cache == ("reference K/V cache (in host memory)", "reference_kv_cache", 0)


def test_the_cli_picks_the_tier_says_what_is_planned_and_states_a_shortfall_in_one_line():
    run = [sys.executable, "-m", "flux2_serving.serving.memory_plan"]
    for gib, tier in ((48, "48gb-fp8"), (32, "32gb-fp8")):
        result = subprocess.run([*run, "--gpu-gib", str(gib)], capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"tier: {tier}" in result.stdout and "NOT RUN: no FP8 engine has been built" in result.stdout
        assert f"tier {tier}: total" in result.stdout and ": fits" in result.stdout
    small = subprocess.run([*run, "--gpu-gib", "24"], capture_output=True, text=True)
    assert small.returncode == 1 and "tier: 32gb-fp8" in small.stdout and "DOES NOT FIT" in small.stdout
    (shortfall,) = [line for line in small.stdout.splitlines() if line.startswith("shortfall:")]
    assert "24 GiB less 15% leaves 20.40" in shortfall
    # No pool size to serve with on a card it does not fit: a next step instead.
    assert "serve with:" not in small.stdout
    (step,) = [line for line in small.stdout.splitlines() if line.startswith("next step:")]
    assert step.startswith("next step: a card of 32 GB or more.")
    assert "the nearest, 32gb-fp8" in step and "needs 22.74 GiB, a card of at least 26.8 GiB" in step
    assert "Cards under 32 GB are not a target" in step and "transformer_cached 8.79 GiB" in step


@pytest.mark.parametrize("argv, expected", [
    (["--tier", "80gb-bf16", "--gpu-gib", "48"],
     "next step: the tier made for a 48 GiB card is 48gb-fp8 (L40S, RTX 6000 Ada (FP8 tensor cores: Ada, Hopper, "
     "Blackwell)): 38.98 GiB; make memory-plan GPU_GIB=48 without TIER= plans it, and TIER=48gb-fp8 builds it "
     "(make engines, make repository, after make export DTYPE=bf16 QUANTIZE=fp8)"),
    (["--reference-tokens", "8192"],
     "next step: 80gb-bf16's own settings fit (64.46 GiB); with --reference-tokens 8192 the plan needs a card of at "
     "least 88.2 GiB"),
    (["--tier", "80gb-bf16", "--gpu-gib", "16"], "next step: a card of 32 GB or more. No tier is made for a 16 GiB"),
    (["--dtype", "fp16", "--gpu-gib", "48"], "next step: a card of at least "),
])
def test_a_plan_that_does_not_fit_says_what_to_do_next(size_9b, monkeypatch, capsys, argv, expected):
    monkeypatch.setattr(memory_plan, "model_size", lambda model: size_9b)  # the 9B count once, not per case
    assert memory_plan.main(argv) == 1
    out = capsys.readouterr().out
    assert "DOES NOT FIT" in out and "serve with:" not in out
    (step,) = [line for line in out.splitlines() if line.startswith("next step:")]
    assert step.startswith(expected), step


def test_a_plan_that_fits_says_what_to_serve_with(size_9b, monkeypatch, capsys):
    monkeypatch.setattr(memory_plan, "model_size", lambda model: size_9b)
    assert memory_plan.main(["--gpu-gib", "80"]) == 0
    out = capsys.readouterr().out
    assert "serve with: tritonserver --cuda-memory-pool-byte-size=<gpu>:" in out and "next step:" not in out


def test_a_tier_sets_the_engine_profiles(onnx_bf16):
    result = run_module("flux2_serving.export.build_engines", "--onnx-dir", str(onnx_bf16), "--dry-run",
                        "--tier", "32gb-fp8")
    assert result.returncode == 0, result.stderr
    cached = result.stdout.split("transformer_cached:")[1].split("vae_decoder:")[0]
    assert "latents         min [1, 16, 16, 128]  opt [1, 64, 64, 128]  max [1, 90, 90, 128]" in cached  # batch 1
    assert "max [2, 2048," in cached  # reference K/V of at most 2048 tokens


def _config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_a_tier_sets_the_repository_envelope_and_the_cache_place(onnx_fp32, tiny_checkpoint, tmp_path):
    repo = tmp_path / "repo"
    result = run_module("flux2_serving.serving.repository", "--onnx-dir", str(onnx_fp32), "--checkpoint",
                        tiny_checkpoint, "--repository", str(repo), "--tier", "32gb-fp8")
    assert result.returncode == 0, result.stderr
    bls = _config(repo / "flux2_klein_kv" / "config.pbtxt").parameters
    assert bls["max_reference_tokens"].string_value == "2048"
    assert bls["max_batch_transformer_cached"].string_value == "1"
    cache = _config(repo / "reference_kv_cache" / "config.pbtxt")
    assert cache.parameters["device"].string_value == "cpu"  # the cache in host memory
    assert cache.parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "yes"
    # Streamed engines run in the component runner's tensorrt_streamed runtime (tests/test_weight_streaming.py);
    # without plans the tier's TensorRT repository is refused as any TensorRT repository is, in one line.
    refused = run_module("flux2_serving.serving.repository", "--onnx-dir", str(onnx_fp32), "--repository",
                         str(tmp_path / "trt"), "--backend", "tensorrt", "--tier", "32gb-fp8",
                         "--engines-dir", str(tmp_path / "no_engines"))
    one_line_error(refused, 2, "expected one text_encoder.trt*.plan")
