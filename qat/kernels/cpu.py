"""CPU fast path: torch's weight-only int4 and int8 matmul kernels over our packed codes.

Why these kernels: on a CPU without native bf16 math a bf16 F.linear is slow, and a weight-only kernel
reads 4x (int4) or 2x (int8) fewer weight bytes. Facts about torch's kernels (checked on 2.13, see
tests/test_kernels.py), which fix the constraints below:

- ``_convert_weight_to_int4pack_for_cpu(u int32 (N, K) in 0..15, inner_k_tiles)`` -> (N, K/2) uint8 in a
  blocked nibble order that depends on the CPU's vector width: never persist it. Needs N % 16 == 0.
- ``_weight_int4pack_mm_for_cpu(x (M, K), w, group, sz (K/group, N, 2))`` computes
  x @ ((u - 8) * sz[..., 0] + sz[..., 1]).T with group in {32, 64, 128, 256}, K % group == 0, x and sz of
  one dtype; bf16/fp16 are vectorised (fp32 is a slow scalar loop), the result is rounded to that dtype
  from an fp32 accumulator. u - 8 is exactly our signed code q, so symmetric weights need no zero term.
- ``_weight_int8pack_mm(x (M, K), w int8 (N, K), scale (N,))`` = (x @ w.T) * scale per channel; it
  crashes (segfault) or returns garbage when K % 16 != 0 on AVX-512 CPUs (K % 8 on AVX2 ones), for bf16
  and fp16 x alike, hence the K check.

Asymmetric zero points: the int4 kernel's float zero term holds -zp * scale rounded to the kernel dtype,
so each served weight may differ from the trained (q - zp) * scale by <= 2^-9 |zp * scale|. Measured
against the float32 reference this moves the output error from 1.65e-3 (pure bf16 rounding of y) to
1.9e-3 relative (norm), and adding the rounding residual back in float32 only brought it to 1.8e-3, since
y is rounded to bf16 again afterwards; not worth a buffer and four ops per call. The int8 kernel has no
zero term: there zp * scale is subtracted in float32 after the kernel has rounded x @ (q * scale).T to
bf16, so the error is relative to that (larger) intermediate.
"""
from __future__ import annotations

import math

import torch

from qat.format.pack import pack, unpack

INT4_GROUP_SIZES = (256, 128, 64, 32)  # what the int4 kernel accepts; largest first for per-channel
INNER_K_TILES = 2  # required argument; the CPU layout does not depend on it (checked on 2.13)
KERNEL_DTYPES = (torch.bfloat16, torch.float16)  # scale dtypes the kernels run in without rounding them


def int4_kernel_group(out_features: int, in_features: int, group_size: int | None) -> int | None:
    """Group size to run the int4 kernel with, or None when the shape is unsupported.

    Per-channel scales run as the largest supported group dividing in_features, with the scale repeated.
    """
    if out_features % 16:
        return None
    if group_size is not None:
        return group_size if group_size in INT4_GROUP_SIZES and in_features % group_size == 0 else None
    return next((g for g in INT4_GROUP_SIZES if in_features % g == 0), None)


def int8_supported(in_features: int, group_size: int | None) -> bool:
    """The int8 kernel is per-channel only, and needs K % 16 == 0 (its AVX-512 path)."""
    return group_size is None and in_features % 16 == 0


def _nibbles(w: torch.Tensor) -> torch.Tensor:
    """(N, K/2) uint8 -> (N*K,) uint8, low nibble of each byte first."""
    return torch.stack((w & 15, w >> 4), dim=-1).flatten()


def _per_kernel_group(t: torch.Tensor, kernel_groups: int) -> torch.Tensor:
    """(N, groups) -> (kernel_groups, N), repeating a per-channel column."""
    return t.t().expand(kernel_groups, -1) if t.shape[1] == 1 else t.t()


def prepare_int4(packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 in_features: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Canonical packed int4 -> the kernel's weight and scale layouts.

    Args:
        packed: (N, K/8) int32 compressed-tensors words. scale: (N, groups) bf16 or fp16.
        zero_point: (N, groups) integers or None.
    Returns:
        weight (N, K/2) uint8 in torch's CPU order, scale_zeros (K/kernel_group, N, 2) in scale.dtype
        holding (scale, -zp * scale), and the kernel group size.
    """
    out_features = packed.shape[0]
    kernel_group = int4_kernel_group(out_features, in_features, group_size)
    if kernel_group is None:
        raise ValueError(f"int4 CPU kernel cannot run a {out_features}x{in_features} weight with "
                         f"group_size={group_size}")
    u = unpack(packed, 4, in_features) + 8  # (N, K) int32 in 0..15, as the converter expects
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, INNER_K_TILES)
    kernel_groups = in_features // kernel_group
    per_group = _per_kernel_group(scale, kernel_groups)
    zeros = torch.zeros_like(per_group)
    if zero_point is not None:
        zeros = (-_per_kernel_group(zero_point, kernel_groups).float() * per_group.float()).to(scale.dtype)
    scale_zeros = torch.stack((per_group, zeros), dim=-1).contiguous()
    return weight, scale_zeros, kernel_group


def _int4_source_index(out_features: int, in_features: int) -> torch.Tensor:
    """Flat index row*K + col of the element held by each nibble of the converted weight: (N*K,) int64.

    Found by converting the index itself, 4 bits at a time: the converter is a pure nibble permutation.
    """
    n = out_features * in_features
    index = torch.arange(n, dtype=torch.int64)
    source = torch.zeros(n, dtype=torch.int64)
    for plane in range(math.ceil(math.log2(max(n, 2)) / 4)):
        codes = ((index >> (4 * plane)) & 15).to(torch.int32).view(out_features, in_features)
        converted = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, INNER_K_TILES)
        source |= _nibbles(converted).to(torch.int64) << (4 * plane)
    return source


def restore_int4(weight: torch.Tensor, scale_zeros: torch.Tensor, in_features: int,
                 group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of `prepare_int4`: (canonical packed int32, scale (N, groups))."""
    out_features = weight.shape[0]
    u = torch.empty(out_features * in_features, dtype=torch.uint8)
    u[_int4_source_index(out_features, in_features)] = _nibbles(weight)
    packed = pack(u.view(out_features, in_features).to(torch.int16) - 8, 4)
    scale = scale_zeros[..., 0].t()
    return packed, (scale if group_size is not None else scale[:, :1]).contiguous()


def prepare_int8(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Canonical packed int8 -> (N, K) int8 codes: the same bytes with the offset 128 flipped off."""
    if packed.shape[1] * 4 != in_features:
        raise ValueError(f"int8 kernel needs in_features % 4 == 0, got {in_features}")
    codes = packed.contiguous().reshape(-1).view(torch.uint8) ^ 0x80
    return codes.view(torch.int8).view(packed.shape[0], in_features)


def restore_int8(weight: torch.Tensor) -> torch.Tensor:
    """Inverse of `prepare_int8`."""
    words = (weight.contiguous().reshape(-1).view(torch.uint8) ^ 0x80).view(torch.int32)
    return words.view(weight.shape[0], -1)


def linear_int4(x: torch.Tensor, weight: torch.Tensor, scale_zeros: torch.Tensor, kernel_group: int,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ ((q - zp) * scale).T + bias with the int4 kernel.

    Args:
        x: (..., K) any float dtype; it runs in scale_zeros.dtype (bf16 or fp16).
        weight, scale_zeros, kernel_group: from `prepare_int4`.
    Returns:
        (..., N) in x.dtype.
    """
    x2 = _as_2d(x, scale_zeros.dtype)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, weight, kernel_group, scale_zeros)
    return _finish(y, bias, x)


def linear_int8(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor | None = None, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ ((q - zp) * scale).T + bias with the per-channel int8 kernel.

    Args:
        x: (..., K) any float dtype; it runs in scale.dtype (bf16 or fp16).
        weight: (N, K) int8 from `prepare_int8`. scale: (N, 1). zero_point: (N, 1) or None.
    Returns:
        (..., N) in x.dtype.
    """
    x2 = _as_2d(x, scale.dtype)
    y = torch.ops.aten._weight_int8pack_mm(x2, weight, scale.reshape(-1))
    if zero_point is not None:  # subtract x @ (zp * scale).T, one zero point per channel, in float32
        zero_term = (zero_point.float() * scale.float()).t()  # (1, N)
        y = y.float() - x2.sum(-1, keepdim=True, dtype=torch.float32) * zero_term
    return _finish(y, bias, x)


def _as_2d(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., K) -> contiguous (M, K) in the kernel dtype; decode-sized calls skip the no-op conversions
    (each costs microseconds, as much as a small layer's whole kernel)."""
    if x.dim() == 2 and x.dtype == dtype and x.is_contiguous():
        return x
    return x.reshape(-1, x.shape[-1]).to(dtype).contiguous()


def _finish(y: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    if bias is not None:
        y = y.float() + bias.float()
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])
