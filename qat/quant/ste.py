"""Straight-through fake quantization as one autograd Function.

Forward: w_hat = (clamp(round(w / s + zp)) - zp) * s. Backward, the straight-through estimator:
  dL/dw = dL/dw_hat where qmin <= w / s + zp <= qmax, else 0;
  dL/ds = sum over the group of dL/dw_hat * ((q - zp) - (w / s) * inside)   (LSQ, Esser et al. 2020).
It saves only the inputs (no full-size intermediates) and recomputes the mask in backward, so QAT
costs little extra memory over float training.
"""
from __future__ import annotations

import torch

from qat.quant.grid import qrange


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, bits: int):
        qmin, qmax = qrange(bits)
        q = torch.clamp(torch.round(x / scale + zero_point), qmin, qmax)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.bits = bits
        return ((q - zero_point) * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, zero_point = ctx.saved_tensors
        qmin, qmax = qrange(ctx.bits)
        v = x / scale + zero_point
        inside = (v >= qmin) & (v <= qmax)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            q = torch.clamp(torch.round(v), qmin, qmax)
            local = (q - zero_point) - torch.where(inside, x / scale, torch.zeros_like(x))
            grad_scale = _sum_to(grad_out * local, scale.shape)
        return grad_x, grad_scale, None, None


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reduce a broadcast gradient back to the shape of the tensor it was broadcast from."""
    dims = tuple(i for i, (a, b) in enumerate(zip(t.shape, shape)) if b == 1 and a != 1)
    return t.sum(dim=dims, keepdim=True) if dims else t


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  bits: int) -> torch.Tensor:
    """Fake-quantize `x` (grouped view) with straight-through gradients for `x` and `scale`."""
    return _FakeQuantize.apply(x, scale, zero_point, bits)


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity forward, gradient multiplied by `factor` (LSQ's g = 1 / sqrt(N * qmax))."""
    return (x - x * factor).detach() + x * factor


def round_ste(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round through `dtype` in forward, identity gradient (learned scales stay exportable)."""
    return x + (x.to(dtype).float() - x).detach()
