"""Bit packing is exact, matches the format doc's worked example, and compressed-tensors bit for bit."""
import importlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.format import pack as packing
from qat.format.pack import pack, pack_zero_points, packed_words, unpack, unpack_zero_points

BITS = range(2, 9)
# odd widths: shorter than a word, not a multiple of 32 / bits, exactly one 32-element block, several
SHAPES = [(1, 1), (3, 7), (5, 33), (2, 100), (4, 64), (7, 96), (1, 250)]


def random_codes(shape, bits, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g)


def ct_helpers():
    """compressed-tensors' own pack/unpack (module moved between releases)."""
    for name in ("compressed_tensors.compressors.pack_quantized.helpers",
                 "compressed_tensors.compressors.quantized_compressors.pack_quantized"):
        try:
            mod = importlib.import_module(name)
            return mod.pack_to_int32, mod.unpack_from_int32
        except (ImportError, AttributeError):
            continue
    pytest.skip("compressed-tensors is not installed")


def test_worked_example_from_format_doc():
    q = torch.tensor([[-8, -7, 0, 7, 1, 2, 3, 4]])
    packed = pack(q, 4)
    assert packed.dtype == torch.int32 and packed.shape == (1, 1)
    assert packed.item() & 0xFFFFFFFF == 0xCBA9F810
    assert torch.equal(unpack(packed, 4, 8), q.int())


def test_three_bit_elements_straddle_words():
    # element 10 of a 3-bit row sits in bits [30, 33): its low two bits end word 0, its top bit starts word 1
    q = torch.full((1, 32), -4)
    q[0, 10] = 3  # stored 7 = 0b111
    words = pack(q, 3)[0].tolist()
    assert words[0] & 0xFFFFFFFF == 0b11 << 30 and words[1] & 1 == 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_exact(bits, shape):
    q = random_codes(shape, bits)
    packed = pack(q, bits)
    assert packed.shape == (shape[0], packed_words(shape[1], bits)) and packed.dtype == torch.int32
    assert torch.equal(unpack(packed, bits, shape[1]), q.int())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_bytewise_fast_path_equals_generic_path(bits, shape):
    q = random_codes(shape, bits, seed=1)
    packed = packing._pack_bytes(q, bits)
    assert torch.equal(packed, packing._pack_blocks(q, bits))
    assert torch.equal(packing._unpack_bytes(packed, bits, shape[1]),
                       packing._unpack_blocks(packed, bits, shape[1]))


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_round_trip_property(bits, rows, cols, seed):
    q = random_codes((rows, cols), bits, seed)
    assert torch.equal(unpack(pack(q, bits), bits, cols), q.int())
    assert torch.equal(unpack_zero_points(pack_zero_points(q, bits), bits, rows), q.int())


def test_extreme_codes_and_float_input():
    for bits in BITS:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.tensor([[lo, hi] * 20], dtype=torch.float32)  # integer-valued, as grid.quantize gives
        assert torch.equal(unpack(pack(q, bits), bits, 40), q.int())


def test_rejects_bad_input():
    with pytest.raises(ValueError, match="do not fit"):
        pack(torch.tensor([[8]]), 4)
    with pytest.raises(ValueError, match="2..8"):
        pack(torch.tensor([[0]]), 9)
    with pytest.raises(ValueError, match="integer codes"):
        pack(torch.tensor([[0.5]]), 4)
    with pytest.raises(ValueError, match="words"):
        unpack(torch.zeros(1, 2, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_compressed_tensors(bits, shape):
    ct_pack, ct_unpack = ct_helpers()
    q = random_codes(shape, bits, seed=2)
    ours = pack(q, bits)
    assert torch.equal(ours, ct_pack(q.to(torch.int8), bits))
    assert torch.equal(ct_unpack(ours, bits, torch.Size(shape)).int(), q.int())


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("shape", [(37, 5), (4, 1), (1, 4)])  # out not a multiple of 32 / bits; one group
def test_zero_points_pack_along_dim0_like_compressed_tensors(bits, shape):
    ct_pack, ct_unpack = ct_helpers()
    zp = random_codes(shape, bits, seed=3)  # (out, groups)
    ours = pack_zero_points(zp, bits)
    assert ours.shape == (packed_words(shape[0], bits), shape[1])
    assert torch.equal(ours, ct_pack(zp.to(torch.int8), bits, packed_dim=0))
    assert torch.equal(ct_unpack(ours, bits, torch.Size(zp.shape), packed_dim=0).int(), zp.int())
    assert torch.equal(unpack_zero_points(ours, bits, shape[0]), zp.int())
