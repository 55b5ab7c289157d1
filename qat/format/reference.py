"""Plain-torch dequantize and linear over the compressed-tensors packed layout: the ground truth.

Every fast path (the CPU weight-only kernels, the Triton kernel) is tested against these two functions,
so they stay deliberately simple: unpack the codes, apply w = (q - zp) * scale in float32, F.linear.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from qat.format.pack import unpack


def expand_groups(t: torch.Tensor, group_size: int | None, in_features: int) -> torch.Tensor:
    """Repeat per-group (out, groups) values along in_features: (out, in_features) float32.

    group_size None (per-channel) expects (out, 1) and broadcasts instead of copying.
    """
    t = t.float()
    if group_size is None:
        if t.dim() == 1:
            t = t[:, None]
        return t
    if t.shape[1] * group_size != in_features:
        raise ValueError(f"{t.shape[1]} groups of {group_size} do not cover in_features={in_features}")
    return t.repeat_interleave(group_size, dim=1)


def dequantize_weight(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      bits: int, group_size: int | None, in_features: int) -> torch.Tensor:
    """Dequantized weight w = (q - zp) * scale.

    Args:
        packed: (out, ceil(in * bits / 32)) int32, compressed-tensors layout.
        scale: (out, groups) float (groups = in / group_size, or 1 per-channel).
        zero_point: (out, groups) integer-valued tensor, unpacked; None when symmetric.
        bits: 2..8.
        group_size: elements per scale group along in_features; None = per-channel.
        in_features: codes per row.
    Returns:
        (out, in_features) float32.
    """
    q = unpack(packed, bits, in_features).float()
    if zero_point is not None:
        q = q - expand_groups(zero_point, group_size, in_features)
    return q * expand_groups(scale, group_size, in_features)


def linear_reference(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor | None, bits: int, group_size: int | None,
                     in_features: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ dequantize_weight(...).T + bias, computed in float32 and returned in x.dtype.

    Args:
        x: (..., in_features) activations of any float dtype.
    Returns:
        (..., out) in x.dtype.
    """
    w = dequantize_weight(packed, scale, zero_point, bits, group_size, in_features)
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return y.to(x.dtype)
