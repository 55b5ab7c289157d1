"""The integer grid: ranges, quantization parameters, quantize and dequantize as pure functions.

These are the compressed-tensors numerics (``../shared/formats/compressed-tensors.md``):
q = clamp(round(w / scale + zp), qmin, qmax) and w_hat = (q - zp) * scale, with an integer zero point
and min/max first extended to include 0. The fake quantizer, the PTQ methods and the packer all call
these (torch only), so a trained grid and an exported grid cannot drift apart.
"""
from __future__ import annotations

import torch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range for `bits`: int4 -> (-8, 7)."""
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_view(w: torch.Tensor, granularity: str, group_size: int | None) -> torch.Tensor:
    """View a (out, in) weight as (rows, groups, elements) so that one scale covers the last dim.

    tensor -> (1, 1, out*in); channel -> (out, 1, in); group -> (out, in/group_size, group_size).
    """
    out_features, in_features = w.shape
    if granularity == "tensor":
        return w.reshape(1, 1, -1)
    if granularity == "channel":
        return w.reshape(out_features, 1, in_features)
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features}")
    return w.reshape(out_features, in_features // group_size, group_size)


def round_scale(scale: torch.Tensor, scale_dtype: str) -> torch.Tensor:
    """Round scales to the dtype they are stored in, and keep them strictly positive."""
    dtype = DTYPES[scale_dtype]
    scale = scale.to(dtype)
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(dtype).eps), scale)
    return scale.float()


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, bits: int, symmetric: bool,
                    scale_dtype: str = "float32") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32, rounded through `scale_dtype`) and integer-valued zero point (float32).

    Symmetric: scale = absmax / ((2^b - 1) / 2), zp = 0. Asymmetric: scale = (max - min) / (2^b - 1),
    zp = clamp(round(qmin - min / scale), qmin, qmax), computed from the stored scale.
    """
    qmin, qmax = qrange(bits)
    min_val = torch.clamp(min_val.float(), max=0.0)
    max_val = torch.clamp(max_val.float(), min=0.0)
    if symmetric:
        absmax = torch.maximum(-min_val, max_val)
        scale = round_scale(absmax / ((qmax - qmin) / 2), scale_dtype)
        return scale, torch.zeros_like(scale)
    scale = round_scale((max_val - min_val) / (qmax - qmin), scale_dtype)
    zero_point = torch.clamp(torch.round(qmin - min_val / scale), qmin, qmax)
    return scale, zero_point


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (as float32) of `x` on the grid; broadcasting shapes as in `group_view`."""
    qmin, qmax = qrange(bits)
    return torch.clamp(torch.round(x.float() / scale + zero_point), qmin, qmax)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    return (q - zero_point) * scale
