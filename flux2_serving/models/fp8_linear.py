"""FP8 linear layers for the `torch` serving flavor: real FP8 matmuls on Hopper/Ada GPUs.

`FP8Linear` replaces an `nn.Linear`: its weight is quantized once to `torch.float8_e4m3fn` with one
float32 scale for the whole tensor (amax / 448, 448 being E4M3's largest finite value); each call
quantizes its input the same way (the input's amax, or a fixed calibrated amax) and multiplies with
`torch._scaled_mm` (FP8 operands, float32 accumulation, the two scales applied to the result, output
in the activations' dtype); a bias is added afterwards in that dtype.

`torch._scaled_mm` needs a CUDA device of compute capability >= 8.9 (Ada, Hopper and later), the
second operand column-major (the weight's transpose, a free view) and both dims of the weight
multiples of 16. Elsewhere (the CPU, older GPUs, other dims) the layer computes the same arithmetic by
dequantizing: the very same FP8 operands (every E4M3 value is exact in bf16 and float32), multiplied
with float32 accumulation and scaled afterwards, so a CPU rehearsal rounds its operands as the GPU
does. `FP8Linear.path` says which ran last ("_scaled_mm" or "fallback"; None before the first call).

`to_fp8(module, keep)` swaps a module's `nn.Linear` layers in place, except those whose qualified name
matches a `keep` pattern; `fp8_wrapper(name, model, device)` builds a served component
(flux2_serving.modeling.components.build, bf16) with its transformer or text-encoder linears in FP8 (the
VAE stays bf16).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Iterable

import torch

from ..contract.fp8_recipe import KEEP, TRANSFORMER_KEEP, kept
from ..contract.graphs import GRAPHS
from ..modeling.components import build

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448.0
PATHS = ("_scaled_mm", "fallback")



def quantize(tensor: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`tensor / scale` rounded to E4M3 (saturating at +-448), computed in float32."""
    return (tensor.float() / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8)


def amax_scale(amax: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale that maps `amax` onto E4M3's largest value (1 for an all-zero tensor)."""
    amax = amax.float()
    return torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).reshape(())


@functools.cache
def fp8_matmul_device(device: torch.device) -> bool:
    """Whether `torch._scaled_mm` runs FP8 on `device`: CUDA (not ROCm, whose FP8 types differ) with compute
    capability >= 8.9."""
    if device.type != "cuda" or torch.version.hip is not None or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


class FP8Linear(torch.nn.Module):
    """An `nn.Linear` with an E4M3 weight and E4M3 inputs, per-tensor scales (see the module docstring).

    `input_amax`: a calibrated absolute maximum of the inputs (a fixed scale, no reduction per call);
    None (default) takes each input's own amax. `backend`: "auto" (`_scaled_mm` where it runs FP8, else
    the fallback), "_scaled_mm" or "fallback" (forced: e.g. a test comparing the two on the CPU, where
    torch 2.13 has a `_scaled_mm` reference kernel).
    """

    def __init__(self, linear: torch.nn.Linear, input_amax: float | None = None, backend: str = "auto"):
        super().__init__()
        if backend not in ("auto", *PATHS):
            raise ValueError(f"backend {backend!r}: expected auto, _scaled_mm or fallback")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.backend = backend
        self.path: str | None = None
        with torch.no_grad():
            weight = linear.weight.detach()
            scale = amax_scale(weight.abs().amax())
            # [out, in], row-major: its transpose is the column-major second operand _scaled_mm needs.
            self.register_buffer("weight", quantize(weight, scale).contiguous())
            self.register_buffer("weight_scale", scale)
            self.register_buffer("input_scale", None if input_amax is None else
                                 amax_scale(torch.tensor(float(input_amax), device=weight.device)))
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def extra_repr(self) -> str:
        calibrated = "calibrated" if self.input_scale is not None else "dynamic"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"input scale {calibrated}, backend={self.backend}")

    def scaled_mm_runs(self, x: torch.Tensor) -> bool:
        """Whether the "auto" backend takes `_scaled_mm` for input `x`."""
        return (fp8_matmul_device(x.device) and self.in_features % 16 == 0 and self.out_features % 16 == 0
                and x.dtype in (torch.bfloat16, torch.float16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, out_dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features)
        if x.shape[0] == 0:  # an empty input (no rows) has no amax: nothing to multiply
            return x.new_zeros(*shape[:-1], self.out_features)
        scale = self.input_scale if self.input_scale is not None else amax_scale(x.detach().abs().amax())
        xq = quantize(x, scale).contiguous()  # row-major, as _scaled_mm's first operand must be
        path = self.backend if self.backend != "auto" else ("_scaled_mm" if self.scaled_mm_runs(x) else "fallback")
        if path == "_scaled_mm":
            y = torch._scaled_mm(xq, self.weight.t(), scale_a=scale, scale_b=self.weight_scale, out_dtype=out_dtype)
        else:
            # The same FP8 operands, widened exactly (every E4M3 value is a bf16 and a float32 value), the scales
            # applied to the product, as _scaled_mm does. On the CPU in float32; on a GPU in the activations' dtype
            # (float32 accumulation; the product is rounded to bf16 once before the scales, _scaled_mm's is not).
            wide = torch.float32 if x.device.type == "cpu" else out_dtype
            y = (torch.mm(xq.to(wide), self.weight.t().to(wide)).float() * (scale * self.weight_scale)).to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        self.path = path
        return y.reshape(*shape[:-1], self.out_features)


def to_fp8(module: torch.nn.Module, keep: Iterable[str] = TRANSFORMER_KEEP, input_amax: dict | None = None,
           backend: str = "auto") -> int:
    """Swap `module`'s `nn.Linear` layers for `FP8Linear` in place, except those whose qualified name matches
    one of the regular expressions `keep` (re.search); returns how many were swapped. `input_amax`: calibrated
    input amax per qualified name (absent names: dynamic). A linear shared by several parents (the prefill's
    shallow copies) becomes one FP8Linear everywhere. Swap after any `.to(dtype)`: a cast converts every
    floating-point buffer, the float8 weights included."""
    keep, input_amax = tuple(keep), input_amax or {}
    swapped: dict[int, torch.nn.Module] = {}
    kept_ids: set[int] = set()
    parents = list(module.named_modules(remove_duplicate=False))
    with torch.no_grad():
        for parent_name, parent in parents:
            for child_name, child in list(parent.named_children()):
                if type(child) is not torch.nn.Linear or id(child) in kept_ids:
                    continue
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                if id(child) not in swapped:
                    if kept(name, keep):
                        kept_ids.add(id(child))
                        continue
                    swapped[id(child)] = FP8Linear(child, input_amax=input_amax.get(name), backend=backend)
                setattr(parent, child_name, swapped[id(child)])
    return len(swapped)


def fp8_paths(module: torch.nn.Module) -> dict[str, int]:
    """How many FP8Linear layers of `module` last ran each path ("not run" for those never called)."""
    return dict(Counter(m.path or "not run" for m in module.modules() if isinstance(m, FP8Linear)))


def fp8_wrapper(name: str, model: str, device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Served component `name` (flux2_serving.modeling.components.build, in `dtype` on `device`) with its
    transformer or text-encoder linears in FP8 (KEEP says which stay in `dtype`); the VAE graphs come back
    unchanged. `model` as build's: a checkpoint, or "random:9b" / "random:tiny". The torch serving flavor
    builds the components an FP8 export quantized with it (parameter quantize=fp8)."""
    wrapper = build(name, model, dtype, device)
    keep = KEEP.get(GRAPHS[name].module)
    if keep is not None:
        to_fp8(wrapper, keep)
    return wrapper
