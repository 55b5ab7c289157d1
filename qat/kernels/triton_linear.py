"""Fused dequantize-and-matmul in Triton: W4A16 / W8A16 / W2A16 straight from the compressed-tensors layout.

Why fused: at batch 1 a Linear is bound by reading its weight, so reading 4-bit words instead of bf16 is
up to 4x less traffic, provided nothing materialises the dequantized weight. The kernel reads the
checkpoint's int32 words as they are stored (packed along in_features: for b bits, word j of a row holds
elements E*j .. E*j + E - 1 with E = 32 / b), so a loaded model needs no repacking.

How a K tile is consumed without reshapes: a tile of BLOCK_KW words is E interleaved sub-tiles; sub-tile e
holds elements E*j + e, obtained with one shift and mask of the whole word tile, and meets the matching
strided columns of x. The stored unsigned code u = q + 2^(b-1) becomes a float with an OR and a subtract
(2^23 trick) instead of a slow int-to-float conversion, and the scale and zero point are applied per word
or per tile, not per element, wherever the group structure allows:
  sum_k (u_k - 2^(b-1) - zp) * s * x_k = s * (sum_k u_k x_k - (2^(b-1) + zp) * sum_k x_k)   (one group)
Two paths share the loop, chosen per config by the autotuner:
  - BLOCK_M == 1, a GEMV for decode: fp32 FMAs into a (BLOCK_KW, BLOCK_N) register tile, scale and zero
    point applied per word (all E elements of a word share a group), reduced once at the end;
  - BLOCK_M >= 16: tl.dot on tensor cores. When the K tile lies in one group (per-channel, or e.g. g128
    at 4 bits with BLOCK_KW = 16) the dot runs on the exact integer codes and the scale is applied to the
    tile's result; otherwise the tile is dequantized per element and cast to the activation dtype.
SPLIT_K > 1 spreads the K tiles of one output tile over several programs (atomic fp32 adds), so that a
short-and-wide problem still fills every SM.

Only long-stable Triton APIs are used (tl.dot, tl.static_range, tl.atomic_add, bitcast, triton.autotune
with early_config_prune and Config.pre_hook), for Triton 3.x down to 3.1. Under TRITON_INTERPRET=1 bf16
arithmetic is wrong (Triton 3.9), so loads are cast to fp32 at once and the dot runs in fp32 (FP32_DOT).
"""
import os
from typing import Optional

import torch
import triton
import triton.language as tl

SUPPORTED_BITS = (2, 4, 8)  # bit widths whose elements never straddle a word
PER_CHANNEL_WORDS = 1 << 30  # GROUP_WORDS for per-channel scales: one group longer than any row


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _zero_output(nargs: dict) -> None:
    """Split-K programs add into the output: it must start at zero (SPLIT_K == 1 configs just store)."""
    nargs["out_ptr"].zero_()


def _config(block_m, block_n, block_kw, split_k, warps=4, stages=3) -> "triton.Config":
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_KW": block_kw, "SPLIT_K": split_k},
                         num_warps=warps, num_stages=stages, pre_hook=_zero_output if split_k > 1 else None)


def get_configs() -> list:
    """Autotune space, 7-25 configs per M regime after `prune_configs` (tuning is paid per M bucket).

    Decode (M <= 8): GEMV rows and 16-row tensor-core tiles, with split-K so that N / BLOCK_N tiles times
    SPLIT_K programs cover every SM of a large GPU even for a 4096-wide layer. Prefill: classic tiles.
    """
    if interpreting():  # the interpreter is slow: one small config; tests pass explicit ones
        return [_config(16, 32, 16, 1)]
    return gpu_configs()


def gpu_configs() -> list:
    """The tuning space proper (also compiled for sm_90 with ptxas to check registers: see the comments)."""
    # GEMV tiles hold 512-1024 words at 2-4 words per thread: ~64-122 registers, no spills (ptxas, sm_90)
    gemv = [_config(1, bn, kw, sk, warps) for bn, kw, warps in ((32, 16, 4), (32, 32, 8), (64, 16, 8),
                                                                (16, 32, 4)) for sk in (1, 2, 4)]
    gemv += [_config(1, 32, 16, 8, 8), _config(1, 64, 16, 8, 8)]
    small = [_config(16, bn, kw, sk, stages=4) for bn, kw, sk in
             ((32, 16, 4), (32, 32, 8), (64, 16, 2), (64, 16, 8), (64, 32, 4), (128, 16, 1), (128, 16, 2))]
    # prefill tiles; the one-group-per-tile path keeps two accumulators, so 8 warps past 32x64 (no spills)
    large = [_config(bm, bn, kw, sk, warps, stages) for bm, bn, kw, sk, warps, stages in
             ((32, 64, 16, 1, 4, 4), (32, 64, 16, 2, 4, 4), (32, 128, 16, 1, 8, 4), (64, 64, 16, 1, 8, 4),
              (64, 64, 32, 2, 8, 3), (64, 128, 16, 1, 8, 3), (64, 128, 32, 1, 8, 3), (128, 64, 16, 1, 8, 3),
              (128, 64, 32, 1, 8, 3))]
    return gemv + small + large


def prune_configs(configs, named_args, **kwargs):
    """GEMV rows only for M <= 8; M tiles no larger than M (rounded up to 16), >= 32 rows once M > 64."""
    m = named_args["M"]
    m_pow2 = max(16, triton.next_power_of_2(m))

    def fits(c):
        block_m = c.kwargs["BLOCK_M"]
        if block_m == 1:
            return m <= 8
        return block_m <= m_pow2 and (m <= 64 or block_m >= 32)

    return [c for c in configs if fits(c)] or configs[-1:]


@triton.jit
def _unsigned(words, e, BITS: tl.constexpr):
    """Slot e of every word of an int32 tile as fp32: the stored code u in [0, 2^BITS), exactly."""
    u = (words >> (e * BITS)) & ((1 << BITS) - 1)
    return (u | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0  # 2^23 + u, minus 2^23


@triton.jit
def _group_params(s_ptr, z_ptr, offs_w, offs_n, mask_n, kt, KW, stride_sn, stride_zn,
                  GROUP_WORDS: tl.constexpr, BLOCK_KW: tl.constexpr, HAS_ZP: tl.constexpr,
                  BITS: tl.constexpr):
    """Scale and code offset 2^(BITS-1) + zp for K tile kt, fp32.

    (1, BLOCK_N) when the tile lies in one group, else (BLOCK_KW, BLOCK_N), one value per word.
    """
    if GROUP_WORDS % BLOCK_KW == 0:
        group = (kt * BLOCK_KW) // GROUP_WORDS
        s_ptrs = (s_ptr + offs_n * stride_sn + group)[None, :]
        z_ptrs = (z_ptr + offs_n * stride_zn + group)[None, :]
        mask = mask_n[None, :]
    else:
        group = offs_w[:, None] // GROUP_WORDS
        mask = (offs_w[:, None] < KW) & mask_n[None, :]
        s_ptrs = s_ptr + offs_n[None, :] * stride_sn + group
        z_ptrs = z_ptr + offs_n[None, :] * stride_zn + group
    scale = tl.load(s_ptrs, mask=mask, other=0.0).to(tl.float32)
    offset = scale * 0.0 + (1 << (BITS - 1))
    if HAS_ZP:
        offset += tl.load(z_ptrs, mask=mask, other=0).to(tl.float32)
    return scale, offset


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # one compile serves every batch size
def quantized_linear_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K, KW,
    stride_xm, stride_wn, stride_wk, stride_sn, stride_zn, stride_om,
    M_BUCKET,  # autotune key only: power-of-2 bucket of M, so every prefill length does not retune
    BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_ZP: tl.constexpr, FP32_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """out (M, N) fp32 (+)= x (M, K) @ ((q - zp) * s).T

    x: (M, K), unit stride along K. w: (N, KW) int32 (any strides: the checkpoint's row-major words, or
    a transposed copy whose loads run along N), KW = ceil(K / E), E = 32 // BITS; element E*j + e of
    a row sits in bits [e*BITS, (e+1)*BITS) of word j, stored as q + 2^(BITS-1). s: (N, groups) scales;
    z: (N, groups) integer zero points when HAS_ZP; one group spans GROUP_WORDS words (PER_CHANNEL_WORDS
    for per-channel). out: (M, N) fp32, zero-filled when SPLIT_K > 1. Grid: (cdiv(M, BLOCK_M) *
    cdiv(N, BLOCK_N), SPLIT_K); program (t, k) owns output tile t and K tiles k, k + SPLIT_K, ... of
    BLOCK_KW words (BLOCK_KW * E elements) each.
    """
    E: tl.constexpr = 32 // BITS
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_pid_n, pid % num_pid_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m, mask_n = offs_m < M, offs_n < N
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(pid_k, tl.cdiv(KW, BLOCK_KW), SPLIT_K):
        offs_w = kt * BLOCK_KW + tl.arange(0, BLOCK_KW)  # (BLOCK_KW,) word index along the row
        words = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_w[:, None] * stride_wk,
                        mask=(offs_w[:, None] < KW) & mask_n[None, :], other=0)  # (BLOCK_KW, BLOCK_N)
        scale, offset = _group_params(s_ptr, z_ptr, offs_w, offs_n, mask_n, kt, KW, stride_sn, stride_zn,
                                      GROUP_WORDS, BLOCK_KW, HAS_ZP, BITS)
        if BLOCK_M == 1:  # GEMV: sum_e u x and sum_e x per word, then one scale and offset per word
            part = tl.zeros((BLOCK_KW, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_KW,), dtype=tl.float32)
            for e in tl.static_range(E):
                offs_k = offs_w * E + e  # (BLOCK_KW,) the columns of x slot e multiplies
                x = tl.load(x_ptr + pid_m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
                part += _unsigned(words, e, BITS) * x[:, None]
                x_sum += x
            acc += (part - offset * x_sum[:, None]) * scale
        elif GROUP_WORDS % BLOCK_KW == 0:  # one group per tile: dot on exact codes, scale the result
            part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            x_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for e in tl.static_range(E):
                offs_k = offs_w * E + e
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
                u = _unsigned(words, e, BITS)
                if FP32_DOT:
                    part += tl.dot(x.to(tl.float32), u)
                else:
                    part += tl.dot(x, u.to(x_ptr.dtype.element_ty))  # codes < 256: exact in bf16/fp16
                x_sum += tl.sum(x.to(tl.float32), axis=1)
            acc += (part - x_sum[:, None] * offset) * scale
        else:  # groups inside the tile: dequantize per element
            for e in tl.static_range(E):
                offs_k = offs_w * E + e
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
                w = (_unsigned(words, e, BITS) - offset) * scale  # (BLOCK_KW, BLOCK_N)
                if FP32_DOT:
                    acc += tl.dot(x.to(tl.float32), w)
                else:
                    acc += tl.dot(x, w.to(x_ptr.dtype.element_ty))
    if BLOCK_M == 1:
        out_ptrs, result, mask = out_ptr + pid_m * stride_om + offs_n, tl.sum(acc, axis=0), mask_n
    else:
        out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
        result, mask = acc, mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, result, mask=mask)
    else:
        tl.atomic_add(out_ptrs, result, mask=mask)


quantized_linear_tuned = triton.autotune(
    configs=get_configs(), key=["M_BUCKET", "N", "K", "stride_wk", "BITS", "GROUP_WORDS", "HAS_ZP"],
    prune_configs_by={"early_config_prune": prune_configs},
)(quantized_linear_kernel)


def launch(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor],
           bits: int, group_size: int, in_features: int, config: Optional[dict] = None) -> torch.Tensor:
    """Check shapes, allocate, run the kernel (autotuned, or with `config` for tests).

    Args:
        x: (..., in_features). packed: (N, ceil(in_features * bits / 32)) int32. scale: (N, groups).
        zero_point: (N, groups) integers or None. group_size: <= 0 for per-channel.
        config: explicit meta-parameters (BLOCK_M, BLOCK_N, BLOCK_KW, SPLIT_K, num_warps) skipping autotune.
    Returns:
        (..., N) in x.dtype (fp32 activations run as bf16 on a GPU: this is an A16 kernel).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits}: the Triton kernel supports {SUPPORTED_BITS}")
    per_word = 32 // bits
    n, kw = packed.shape
    if packed.dtype != torch.int32 or kw != triton.cdiv(in_features, per_word):
        raise ValueError(f"packed must be int32 (N, {triton.cdiv(in_features, per_word)}), "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {in_features}")
    if group_size > 0 and (group_size % per_word or scale.shape[1] * group_size < in_features):
        raise ValueError(f"group_size={group_size} must be a multiple of {per_word} and cover in_features")
    x2 = x.reshape(-1, in_features)
    if x2.dtype not in (torch.bfloat16, torch.float16) and not interpreting():
        x2 = x2.to(torch.bfloat16)
    x2, scale = x2.contiguous(), scale.contiguous()
    zero_point = None if zero_point is None else zero_point.contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=torch.float32)  # split-K configs zero it (pre_hook)
    group_words = group_size // per_word if group_size > 0 else PER_CHANNEL_WORDS
    zp = zero_point if zero_point is not None else scale  # never read when HAS_ZP is False
    args = (x2, packed, scale, zp, out, m, n, in_features, kw,
            x2.stride(0), packed.stride(0), packed.stride(1), scale.stride(0), zp.stride(0), out.stride(0),
            triton.next_power_of_2(m))
    meta = dict(BITS=bits, GROUP_WORDS=group_words, HAS_ZP=zero_point is not None, FP32_DOT=interpreting())
    if config is None:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), c["SPLIT_K"])
        quantized_linear_tuned[grid](*args, **meta)
    else:
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), config["SPLIT_K"])
        if config["SPLIT_K"] > 1:
            out.zero_()
        quantized_linear_kernel[grid](*args, **meta, **config)
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


@torch.library.custom_op("qat::quantized_linear", mutates_args=())
def quantized_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor,
                     zero_point: Optional[torch.Tensor], bits: int, group_size: int,
                     in_features: int) -> torch.Tensor:
    """y = x @ ((q - zp) * scale).T as one op that torch.compile treats as opaque; see `launch`."""
    return launch(x, packed, scale, zero_point, bits, group_size, in_features)


@quantized_linear.register_fake
def _quantized_linear_fake(x, packed, scale, zero_point, bits, group_size, in_features):
    return x.new_empty((*x.shape[:-1], packed.shape[0]))
