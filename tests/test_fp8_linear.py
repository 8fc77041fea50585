"""flux2_serving.models.fp8_linear on the CPU: the fallback path's arithmetic against an fp32 Linear (a bound
derived from E4M3's rounding), the float8 weights, which transformer layers stay in bf16, and, where this
torch has a CPU `_scaled_mm` for float8, that path against the fallback."""

from __future__ import annotations

import re

import pytest
import torch

from flux2_serving.modeling.checkpoint import random_module
from flux2_serving.models.fp8_linear import (
    FP8,
    TRANSFORMER_KEEP,
    FP8Linear,
    fp8_matmul_device,
    fp8_paths,
    fp8_wrapper,
    to_fp8,
)
from tests.support import rel_l2

# The layers NVIDIA's FLUX recipe keeps, by their names in diffusers' Flux2Transformer2DModel.
KEPT = {"time_guidance_embed.timestep_embedder.linear_1", "time_guidance_embed.timestep_embedder.linear_2",
        "double_stream_modulation_img.linear", "double_stream_modulation_txt.linear",
        "single_stream_modulation.linear", "x_embedder", "context_embedder", "norm_out.linear", "proj_out"}


def _linear(in_features=256, out_features=96, bias=True, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features, bias=bias).eval()


def _inputs(rows=40, features=256, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, rows // 2, features, generator=g)
    x[0, 0, :4] = torch.tensor([9.0, -7.0, 1e-4, 3e-6])  # an outlier sets the scale; tiny values go subnormal
    return x


def _fp8_error_bound(x, weight, x_scale, w_scale):
    """|FP8 result - exact| elementwise, from E4M3's rounding: a normal value is off by at most 2^-4 of itself (3
    mantissa bits), a subnormal one by at most half its spacing, 2^-10 of the scale; x^ w^ - x w = e_x w^ + x e_w."""
    e_x = 2**-4 * x.abs() + 2**-10 * x_scale
    e_w = 2**-4 * weight.abs() + 2**-10 * w_scale
    bound = e_x @ (weight.abs() + e_w).t() + x.abs() @ e_w.t()
    return bound * 1.001 + 1e-6  # float32 accumulation


def test_fallback_matches_an_fp32_linear_within_e4m3_rounding():
    linear, x = _linear(), _inputs()
    expected = linear(x)
    layer = FP8Linear(linear)
    assert layer.path is None and not fp8_matmul_device(torch.device("cpu"))
    with torch.no_grad():
        actual = layer(x)
    assert layer.path == "fallback" and actual.shape == expected.shape and actual.dtype == torch.float32
    x_scale = x.abs().amax() / 448
    bound = _fp8_error_bound(x.reshape(-1, 256), linear.weight.detach(), x_scale, layer.weight_scale)
    error = (actual - expected).detach().reshape(-1, 96).abs()
    assert (error <= bound).all(), (error / bound).max()
    assert rel_l2(actual.detach(), expected.detach()) < 0.05  # typical: errors partly cancel (measured 0.035)


def test_weights_are_float8_with_a_per_tensor_scale():
    linear = _linear()
    layer = FP8Linear(linear)
    weight = linear.weight.detach()
    assert layer.weight.dtype == FP8 and layer.weight.shape == (96, 256) and layer.weight.is_contiguous()
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.numel() == 1
    assert torch.equal(layer.weight_scale, weight.abs().amax() / 448)
    assert layer.weight.float().abs().max() == 448  # the amax lands on E4M3's largest value
    dequantized = layer.weight.float() * layer.weight_scale
    assert ((dequantized - weight).abs() <= 2**-4 * weight.abs() + 2**-10 * layer.weight_scale).all()
    assert layer.bias.dtype == torch.float32 and torch.equal(layer.bias, linear.bias)
    assert not list(layer.parameters())  # buffers: nothing to train, ModelMixin.dtype stays the model's


def test_calibrated_input_amax_and_empty_input():
    linear, x = _linear(bias=False), _inputs()
    with torch.no_grad():
        dynamic = FP8Linear(linear)(x)
        calibrated = FP8Linear(linear, input_amax=x.abs().amax().item())
        assert torch.equal(calibrated(x), dynamic)  # the same scale
        saturated = calibrated(x * 100)  # beyond the calibrated range: clamped to +-448 x scale, never inf
        assert torch.isfinite(saturated).all()
        empty = FP8Linear(linear)(torch.zeros(1, 0, 256))
    assert empty.shape == (1, 0, 96)


def test_bf16_activations_come_back_in_bf16():
    linear = _linear().to(torch.bfloat16)
    x = _inputs().to(torch.bfloat16)
    with torch.no_grad():
        out = FP8Linear(linear)(x)
        expected = linear(x)
    assert out.dtype == torch.bfloat16 and rel_l2(out.float(), expected.float()) < 0.06


def _cpu_scaled_mm_works() -> bool:
    try:
        a = torch.ones(16, 16).to(FP8)
        out = torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.float32)
        return bool((out == 16).all())
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


@pytest.mark.skipif(not _cpu_scaled_mm_works(), reason="this torch has no CPU torch._scaled_mm for float8")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaled_mm_path_equals_the_fallback(dtype):
    """The two paths take the same FP8 operands and scales: only the accumulation order (float32) and the
    output's one rounding (bf16) may differ."""
    linear, x = _linear().to(dtype), _inputs().to(dtype)
    with torch.no_grad():
        fast = FP8Linear(linear, backend="_scaled_mm")
        slow = FP8Linear(linear, backend="fallback")
        a, b = fast(x).float(), slow(x).float()
    assert fast.path == "_scaled_mm" and slow.path == "fallback"
    tolerance = 1e-5 if dtype == torch.float32 else 2**-8  # float32 summation order / one bf16 rounding
    assert ((a - b).abs() <= tolerance * b.abs().max()).all(), (a - b).abs().max()


def test_to_fp8_keeps_nvidias_layers_of_the_flux2_transformer():
    transformer = random_module("transformer", "tiny", torch.float32)
    linears = {name for name, m in transformer.named_modules() if type(m) is torch.nn.Linear}
    assert KEPT <= linears  # the names the keep list is written for exist in diffusers' model
    for name in linears:  # and the patterns match exactly those
        assert any(re.search(p, name) for p in TRANSFORMER_KEEP) == (name in KEPT), name
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 128, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 192, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 4), txt_ids=torch.zeros(8, 4), guidance=None, return_dict=False)
    with torch.no_grad():
        expected = transformer(**inputs)[0]
        swapped = to_fp8(transformer)
        actual = transformer(**inputs)[0]
    assert swapped == len(linears) - len(KEPT) == 28
    kept = {name for name, m in transformer.named_modules() if type(m) is torch.nn.Linear}
    assert kept == KEPT
    assert fp8_paths(transformer) == {"fallback": 28}
    assert torch.isfinite(actual).all() and rel_l2(actual, expected) < 0.02  # measured 1.3e-3


def test_fp8_wrapper_swaps_transformer_and_text_encoder_but_not_the_vae():
    cached = fp8_wrapper("transformer_cached", "random:tiny")
    kept = {name for name, m in cached.named_modules() if type(m) is torch.nn.Linear}
    assert kept == {f"transformer.{name}" for name in KEPT}  # the patterns hold under the wrapper's prefix
    assert fp8_paths(cached) == {"not run": 28}
    assert next(p for p in cached.parameters()).dtype == torch.bfloat16
    prefill = fp8_wrapper("transformer_prefill", "random:tiny")
    assert fp8_paths(prefill) == {"not run": 16}  # the reference stream only: no text-stream layers
    text = fp8_wrapper("text_encoder", "random:tiny")
    assert not any(type(m) is torch.nn.Linear for m in text.modules())
    assert fp8_paths(text) == {"not run": 27 * 7}  # 27 kept decoder layers x q, k, v, o, gate, up, down
    assert fp8_paths(fp8_wrapper("vae_decoder", "random:tiny")) == {}
