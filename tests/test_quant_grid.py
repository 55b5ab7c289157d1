"""Fake quantization equals an independent per-group reference, and compressed-tensors' numerics."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qat.format.grid import DTYPES, qrange
from qat.quant import WeightSpec
from qat.quant.fake_quant import FakeQuantWeight

BITS = range(2, 9)
LAYOUTS = [("tensor", None), ("channel", None), ("group", 16), ("group", 32)]
SHAPES = [(7, 96), (13, 32), (1, 64), (33, 160)]  # odd row counts, widths that groups divide


def reference_fake_quant(w, bits, granularity, group_size, symmetric, scale_dtype):
    """Plain loops over scale groups, written from the format description, not from qat.quant."""
    qmin, qmax = qrange(bits)
    out = torch.empty_like(w)
    rows, cols = w.shape
    if granularity == "tensor":
        blocks = [(slice(None), slice(None))]
    elif granularity == "channel":
        blocks = [(slice(r, r + 1), slice(None)) for r in range(rows)]
    else:
        blocks = [(slice(r, r + 1), slice(c, c + group_size))
                  for r in range(rows) for c in range(0, cols, group_size)]
    dtype = DTYPES[scale_dtype]
    for rs, cs in blocks:
        g = w[rs, cs]
        lo, hi = min(g.min().item(), 0.0), max(g.max().item(), 0.0)
        lo_t, hi_t = torch.tensor(lo), torch.tensor(hi)
        if symmetric:
            scale = torch.maximum(-lo_t, hi_t) / ((qmax - qmin) / 2)
        else:
            scale = (hi_t - lo_t) / (qmax - qmin)
        scale = scale.to(dtype)
        if scale == 0:
            scale = torch.tensor(torch.finfo(dtype).eps, dtype=dtype)
        scale = scale.float()
        zp = torch.tensor(0.0) if symmetric else torch.clamp(torch.round(qmin - lo_t / scale), qmin, qmax)
        q = torch.clamp(torch.round(g / scale + zp), qmin, qmax)
        out[rs, cs] = (q - zp) * scale
    return out


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity,group_size", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("scale_dtype", ["bfloat16", "float32"])
def test_fake_quant_matches_reference(bits, granularity, group_size, symmetric, scale_dtype):
    torch.manual_seed(bits)
    for shape in SHAPES:
        w = torch.randn(shape) * torch.rand(shape[0], 1) * 3  # rows of different ranges
        w[0, :5] = 0.0
        if granularity == "group" and shape[1] % group_size:
            continue
        spec = WeightSpec(bits=bits, granularity=granularity, group_size=group_size,
                          symmetric=symmetric, scale_dtype=scale_dtype)
        got = FakeQuantWeight(spec)(w)
        want = reference_fake_quant(w, bits, granularity, group_size, symmetric, scale_dtype)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("granularity,group_size", LAYOUTS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_fake_quant_matches_compressed_tensors(bits, granularity, group_size, symmetric):
    """The same grid as the format's own implementation (float32 scales: no storage rounding)."""
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    torch.manual_seed(100 + bits)
    w = torch.randn(24, 64)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=granularity,
                            group_size=group_size)
    spec = WeightSpec(bits=bits, granularity=granularity, group_size=group_size,
                      symmetric=symmetric, scale_dtype="float32")
    fq = FakeQuantWeight(spec)
    grouped = fq._grouped(w)
    lo, hi = grouped.amin(-1), grouped.amax(-1)  # (rows, groups)
    if granularity == "tensor":
        lo, hi = lo.reshape(1), hi.reshape(1)
    scale, zp = calculate_qparams(lo, hi, args)
    theirs = fake_quantize(w, scale, zp, args)
    torch.testing.assert_close(fq(w), theirs, rtol=0, atol=0)
    q, our_scale, our_zp = fq.quantized(w)
    torch.testing.assert_close(our_scale.reshape(scale.shape), scale, rtol=0, atol=0)
    torch.testing.assert_close(our_zp.reshape(zp.shape).to(zp.dtype), zp, rtol=0, atol=0)


def test_symmetric_int4_scale_is_absmax_over_7_5():
    w = torch.tensor([[-3.0, 0.5, 1.0, 7.5]])
    fq = FakeQuantWeight(WeightSpec(bits=4, granularity="channel", group_size=None,
                                    scale_dtype="float32"))
    q, scale, zp = fq.quantized(w)
    assert scale.item() == 1.0 and zp.item() == 0
    assert q.tolist() == [[-3, 0, 1, 7]]  # 7.5 rounds to 8 and clips to qmax = 7


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), rows=st.integers(1, 9), groups=st.integers(1, 5),
       group_size=st.sampled_from([8, 16, 32]), symmetric=st.booleans(),
       spread=st.floats(1e-3, 1e3), seed=st.integers(0, 2**16))
def test_codes_in_range_and_error_bounded(bits, rows, groups, group_size, symmetric, spread, seed):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, groups * group_size, generator=gen) * spread
    fq = FakeQuantWeight(WeightSpec(bits=bits, group_size=group_size, symmetric=symmetric,
                                    scale_dtype="float32"))
    q, scale, zp = fq.quantized(w)
    qmin, qmax = qrange(bits)
    assert q.min() >= qmin and q.max() <= qmax
    assert torch.equal(zp, torch.round(zp))
    err = (fq(w) - w).abs().reshape(rows, groups, group_size)
    # Asymmetric grids cover [min, max] exactly: error within half a step. Symmetric grids clip the
    # top end at qmax (absmax / 7.5 * 7 for int4): error within one step there.
    bound = scale.unsqueeze(-1) * (0.5 if not symmetric else 1.0) * (1 + 1e-5)
    assert (err <= bound).all()


@pytest.mark.parametrize("bits,symmetric", itertools.product([2, 4, 8], [True, False]))
def test_zero_stays_exactly_zero(bits, symmetric):
    """Zero is on every grid (min/max extended to include it): pruned weights stay pruned."""
    torch.manual_seed(bits)
    w = torch.randn(8, 64) + (0 if symmetric else 2.0)
    w[:, ::3] = 0.0
    out = FakeQuantWeight(WeightSpec(bits=bits, symmetric=symmetric))(w)
    assert (out[:, ::3] == 0).all()
