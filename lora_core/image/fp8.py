"""``model.fp8_base``: keep the frozen Linear/Conv2d weights in float8 (e4m3fn), one byte each, as kohya's
``--fp8_base`` does — it halves the base model's memory against bf16 (SDXL's UNet: about 5 GB → 2.6 GB).

How a layer computes: its fp8 weight times a per-output-channel scale is upcast to the compute dtype (the run's
``mixed_precision``) just for that layer's matmul/convolution and dropped right after. The scale (the channel's
largest magnitude / 448, e4m3fn's largest finite value) keeps small weights from underflowing: a plain cast flushes
everything below 2⁻⁹ to zero. The backward pass needs only the input gradient (the base is frozen), and it upcasts
the weight again instead of keeping the upcast copy alive from the forward pass — otherwise autograd would hold a
bf16 copy of every layer until backward and the savings would be gone. LoRA layers (``lora_A``/``lora_B``) stay in
fp32: they are what is trained. Works on any device: on a CPU it saves memory, not time.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


class _Fp8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype) * scale.to(dtype)
            return F.linear(x.to(dtype), w, None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        with torch.autocast(grad.device.type, enabled=False):
            w = weight.to(ctx.dtype) * scale.to(ctx.dtype)
            grad_x = grad.to(ctx.dtype).matmul(w)
        return grad_x.to(ctx.x_dtype), None, None, None, None


class _Fp8Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, scale, bias, dtype, stride, padding, dilation, groups):
        ctx.save_for_backward(weight, scale)
        ctx.dtype, ctx.x_dtype, ctx.x_shape = dtype, x.dtype, x.shape
        ctx.conv = (stride, padding, dilation, groups)
        with torch.autocast(x.device.type, enabled=False):
            w = weight.to(dtype) * scale.to(dtype)
            return F.conv2d(x.to(dtype), w, None if bias is None else bias.to(dtype), stride, padding, dilation,
                            groups)

    @staticmethod
    def backward(ctx, grad):
        weight, scale = ctx.saved_tensors
        none = (None,) * 8
        if not ctx.needs_input_grad[0]:
            return (None, *none)
        stride, padding, dilation, groups = ctx.conv
        with torch.autocast(grad.device.type, enabled=False):
            w = weight.to(ctx.dtype) * scale.to(ctx.dtype)
            grad_x = torch.nn.grad.conv2d_input(ctx.x_shape, w, grad.to(ctx.dtype), stride, padding, dilation,
                                                groups)
        return (grad_x.to(ctx.x_dtype), *none)


class Fp8Linear(torch.nn.Linear):
    """A frozen nn.Linear whose weight is stored in fp8 (see the module docstring)."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Linear.apply(x, self.weight, self.fp8_scale, self.bias, self.compute_dtype)


class Fp8Conv2d(torch.nn.Conv2d):
    """A frozen nn.Conv2d (zero padding) whose weight is stored in fp8."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Conv2d.apply(x, self.weight, self.fp8_scale, self.bias, self.compute_dtype, self.stride,
                                self.padding, self.dilation, self.groups)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 weight, fp32 scale per output channel) with ``fp8 * scale ≈ weight``."""
    w = weight.detach().float()
    amax = w.abs().reshape(w.shape[0], -1).amax(dim=1).clamp(min=1e-12)
    scale = (amax / FP8_MAX).reshape(-1, *([1] * (w.ndim - 1)))
    return (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _convertible(name: str, module: torch.nn.Module) -> bool:
    if ".lora_" in f".{name}" or type(module) not in (torch.nn.Linear, torch.nn.Conv2d):
        return False
    if module.weight.requires_grad or (module.bias is not None and module.bias.requires_grad):
        return False  # only frozen weights: a trained layer needs its full-precision weight
    if isinstance(module, torch.nn.Conv2d):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return True


def convertible_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers `to_fp8` converts: frozen nn.Linear/nn.Conv2d outside the LoRA (what the memory plan counts)."""
    return [m for n, m in model.named_modules() if _convertible(n, m)]


def to_fp8(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Store every frozen Linear/Conv2d weight of ``model`` in fp8, computing in ``compute_dtype``; LoRA layers and
    everything else (norms, embeddings, biases) are left as they are. Returns the number of layers converted.
    Converts layer by layer, so the peak is the model plus one layer's fp32 copy."""
    count = 0
    for name, module in list(model.named_modules()):
        if not _convertible(name, module):
            continue
        weight8, scale = quantize_weight(module.weight)
        module.weight = torch.nn.Parameter(weight8, requires_grad=False)
        module.register_buffer("fp8_scale", scale.to(module.weight.device), persistent=False)
        if module.bias is not None:
            module.bias = torch.nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        module.__class__ = Fp8Linear if isinstance(module, torch.nn.Linear) else Fp8Conv2d
        module.compute_dtype = compute_dtype
        count += 1
    return count


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype == FP8


def fp8_bytes(modules: Iterable[torch.nn.Module]) -> int:
    """Bytes held by fp8 weights (what the memory plan counts at one byte per weight)."""
    return sum(p.numel() for m in modules for p in m.parameters() if is_fp8(p))
