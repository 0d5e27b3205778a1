"""fp8 storage of the denoiser's frozen Linear weights (opt-in, lossy: `--base_precision fp8`).

Each frozen `nn.Linear` inside the repeated blocks keeps its weight as float8 e4m3 with one float32
scale per output channel (amax / 448, so every row uses the whole e4m3 range) and is upcast to the
compute dtype one layer at a time, in the forward and again for the backward: a custom autograd
function saves the fp8 weight, not the upcast copy, so at most one layer's upcast weight exists
at a time. LoRA layers (trainable) stay in float32; biases, norms and everything outside the
blocks stay in the run's dtype. Written here rather than taken from torchao: see docs/design.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 weight, float32 scale per output channel) with weight ~ e4m3 * scale[:, None]."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def upcast(weight_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weight in `dtype` (e4m3 values are exact in bf16; the scale is applied in `dtype`)."""
    return weight_fp8.to(dtype) * scale.to(dtype)[:, None]


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W stored in fp8; the backward upcasts W again (W and b are frozen)."""

    @staticmethod
    def forward(ctx, x, weight_fp8, scale, bias):
        ctx.save_for_backward(weight_fp8, scale)
        return F.linear(x, upcast(weight_fp8, scale, x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        weight_fp8, scale = ctx.saved_tensors
        return grad.matmul(upcast(weight_fp8, scale, grad.dtype)), None, None, None


class Fp8Linear(torch.nn.Linear):
    """An `nn.Linear` whose frozen weight is stored in fp8 (`weight`, e4m3) with `weight_scale`
    (float32, one per output channel). Made from a Linear in place by `store_fp8`."""

    weight_scale: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Linear.apply(x, self.weight, self.weight_scale, self.bias)


def frozen_linears(module: torch.nn.Module) -> list[torch.nn.Linear]:
    """The `nn.Linear` layers of `module` whose weight is frozen (a LoRA's base layers, not its A/B)."""
    return [m for m in module.modules() if type(m) is torch.nn.Linear and not m.weight.requires_grad]


def store_fp8(module: torch.nn.Module, *, work: torch.device, keep_on: torch.device) -> int:
    """Turn each frozen Linear of `module` into an `Fp8Linear`, quantizing on `work` (the GPU:
    fast) and keeping the fp8 weight and scale on `keep_on`. Returns the number of layers."""
    layers = frozen_linears(module)
    for layer in layers:
        weight, scale = quantize(layer.weight.data.to(work))
        layer.weight = torch.nn.Parameter(weight.to(keep_on), requires_grad=False)
        layer.register_buffer("weight_scale", scale.to(keep_on))
        layer.__class__ = Fp8Linear
    return len(layers)
