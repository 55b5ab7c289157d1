"""Dense bit packing of integer codes into int32 words: the compressed-tensors `pack-quantized` layout.

Byte-for-byte what ``shared/formats/compressed-tensors.md`` describes and what vLLM and the
``compressed-tensors`` package read: codes get the offset 2^(b-1) so they are unsigned, element i of a row
occupies bits [i*b, i*b + b) of the row's bit stream, least significant bit first, and the stream is cut
into int32 words. 32 elements fill exactly b words, so every block of 32 elements is packed independently;
for 3, 5, 6 and 7 bits an element may straddle two words.

Two implementations of the same layout. For 2, 4 and 8 bits a byte holds whole elements, so on a
little-endian host the words are just bytes filled LSB first and viewed as int32: a few uint8 passes,
~1 s per 100M weights on two cores. For 3, 5, 6 and 7 bits the generic path works on blocks of 32 elements
in int64 (an element shifted to its bit offset needs up to 39 bits, and int64 keeps every intermediate
exact without unsigned types); it is ~4x slower, and processes rows in chunks so the int64 temporaries
stay bounded for large layers.
"""
from __future__ import annotations

import math
import sys

import torch

from qat.format.grid import qrange

BLOCK = 32  # elements per block: 32 * b bits is exactly b words, so blocks never share a word
CHUNK_ELEMENTS = 1 << 22  # elements per chunk: bounds the int64 temporaries to ~100 MB


def _check_bits(bits: int) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing supports 2..8 bits")


def _layout(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each of the 32 elements of a block: (32,), (32,)."""
    starts = torch.arange(BLOCK, device=device, dtype=torch.int64) * bits
    return starts // 32, starts % 32


def _row_chunks(rows: int, cols: int):
    step = max(1, CHUNK_ELEMENTS // max(cols, 1))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def packed_words(in_features: int, bits: int) -> int:
    """Words per packed row: ceil(in_features * bits / 32)."""
    return math.ceil(in_features * bits / 32)


def _bytewise(bits: int) -> bool:
    """Whole elements per byte, and bytes laid out in word order (little-endian host)."""
    return bits in (2, 4, 8) and sys.byteorder == "little"


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed codes row by row into int32 words.

    Args:
        q: (out, in) integer (or integer-valued float) codes in [-2^(b-1), 2^(b-1) - 1].
        bits: 2..8.
    Returns:
        (out, ceil(in * bits / 32)) int32; the unsigned word pattern reinterpreted as int32.
    """
    _check_bits(bits)
    if q.dim() != 2:
        raise ValueError(f"pack expects a 2-D (out, in) tensor, got shape {tuple(q.shape)}")
    lo, hi = qrange(bits)
    if q.is_floating_point() and not torch.equal(q, q.round()):
        raise ValueError("pack expects integer codes; got a float tensor with fractional values")
    if q.numel():
        qmin, qmax = torch.aminmax(q)
        if qmin < lo or qmax > hi:
            raise ValueError(f"codes in [{int(qmin)}, {int(qmax)}] do not fit {bits} bits [{lo}, {hi}]")
    rows, cols = q.shape
    out = torch.empty(rows, packed_words(cols, bits), dtype=torch.int32, device=q.device)
    if out.numel() == 0:
        return out
    if _bytewise(bits):
        return _pack_bytes(q, bits)
    for rs in _row_chunks(rows, cols):
        out[rs] = _pack_blocks(q[rs], bits)
    return out


def _pack_bytes(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = q.shape
    per = 8 // bits  # elements per byte
    words = packed_words(cols, bits)
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    u = torch.nn.functional.pad(u, (0, words * 4 * per - cols))  # (rows, 4 * words * per)
    if per > 1:
        u = u.view(rows, words * 4, per)
        packed = u[..., 0].clone()
        for e in range(1, per):  # over the 2 or 4 slots of a byte, each a whole-tensor op
            packed |= u[..., e] << (e * bits)
        u = packed
    # through 1-D: a (1, n) tensor may be "contiguous" with an odd row stride that view() refuses
    return u.contiguous().reshape(-1).view(torch.int32).view(rows, words)


def _pack_blocks(q: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = q.shape
    word, offset = _layout(bits, q.device)
    blocks = math.ceil(cols / BLOCK)
    u = torch.nn.functional.pad(q.to(torch.int64) + (1 << (bits - 1)), (0, blocks * BLOCK - cols))
    shifted = u.view(rows, blocks, BLOCK) << offset  # (rows, blocks, 32), disjoint bit ranges
    # Bits never overlap, so summing the elements that start in a word is an OR; the part above bit 31
    # belongs to the next word (the straddling elements).
    sums = torch.zeros(rows, blocks, bits, dtype=torch.int64, device=q.device)
    sums.index_add_(2, word, shifted)
    carry = torch.nn.functional.pad(sums[..., :-1] >> 32, (1, 0))
    words = (sums & 0xFFFFFFFF) | carry
    words = torch.where(words >= 1 << 31, words - (1 << 32), words)  # uint32 pattern as int32
    return words.view(rows, blocks * bits)[:, :packed_words(cols, bits)].to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Exact inverse of `pack`.

    Args:
        packed: (out, ceil(in_features * bits / 32)) int32.
        bits: 2..8.
        in_features: number of codes per row (the packed row may end in padding bits).
    Returns:
        (out, in_features) int32 signed codes.
    """
    _check_bits(bits)
    rows, words = packed.shape
    if packed.dtype != torch.int32:
        raise ValueError(f"packed weights must be int32, got {packed.dtype}")
    if words != packed_words(in_features, bits):
        raise ValueError(f"packed rows have {words} words; {in_features} codes of {bits} bits need "
                         f"{packed_words(in_features, bits)}")
    out = torch.empty(rows, in_features, dtype=torch.int32, device=packed.device)
    if out.numel() == 0:
        return out
    if _bytewise(bits):
        return _unpack_bytes(packed, bits, in_features)
    for rs in _row_chunks(rows, in_features):
        out[rs] = _unpack_blocks(packed[rs], bits, in_features)
    return out


def _unpack_bytes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    rows = packed.shape[0]
    u = packed.contiguous().reshape(-1).view(torch.uint8).view(rows, -1)  # (rows, 4 * words)
    if bits < 8:
        mask = (1 << bits) - 1
        u = torch.stack([(u >> (e * bits)) & mask for e in range(8 // bits)], dim=-1).view(rows, -1)
    # u - 2^(b-1) fits int8 for every b <= 8: flip the top bit of a uint8, or subtract from a small value.
    codes = (u ^ 0x80).view(torch.int8) if bits == 8 else u.view(torch.int8) - (1 << (bits - 1))
    return codes[:, :in_features].to(torch.int32)


def _unpack_blocks(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    rows, words = packed.shape
    word, offset = _layout(bits, packed.device)
    blocks = math.ceil(in_features / BLOCK)
    w = packed.to(torch.int64) & 0xFFFFFFFF
    w = torch.nn.functional.pad(w, (0, blocks * bits - words)).view(rows, blocks, bits)
    # Each word joined with its successor in one int64, so a straddling element is one shift away.
    pairs = w | (torch.nn.functional.pad(w[..., 1:], (0, 1)) << 32)
    codes = (pairs[..., word] >> offset) & ((1 << bits) - 1)  # (rows, blocks, 32)
    codes = codes.view(rows, blocks * BLOCK)[:, :in_features] - (1 << (bits - 1))
    return codes.to(torch.int32)


def pack_zero_points(zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack (out, groups) integer zero points along dim 0, as compressed-tensors stores them.

    Returns:
        (ceil(out * bits / 32), groups) int32.
    """
    return pack(zero_point.t().contiguous(), bits).t().contiguous()


def unpack_zero_points(packed: torch.Tensor, bits: int, out_features: int) -> torch.Tensor:
    """Inverse of `pack_zero_points`: (ceil(out * bits / 32), groups) int32 -> (out, groups) int32."""
    return unpack(packed.t().contiguous(), bits, out_features).t().contiguous()
