"""Our CPU GEMV (qat/csrc/gemv.c) and the int8 embedding/head: float32 results equal to
the reference dequantization up to summation order; skipped where the CPU lacks AVX2/FMA or no C
compiler is installed."""
from __future__ import annotations

import pytest
import torch
from test_kernels import direct_weight, make_codes

from qat.export.writer import export_model
from qat.export.load import load_quantized, weight_bytes
from qat import native
from qat.kernels import QuantizedLinear
from qat.kernels.embedding import Int8Embedding, Int8Head, quantize_rows
from qat.quant import QuantConfig, WeightSpec, prepare

needs_native = pytest.mark.skipif(not native.available(), reason="no AVX2/FMA CPU or C compiler")


def rel_err(y, ref):
    return ((y.double() - ref.double()).norm() / ref.double().norm()).item()


def test_build_is_atomic_and_cached(tmp_path):
    if not native._cpu_has_avx2_fma():
        pytest.skip("no AVX2/FMA")
    first = native.build(tmp_path)
    stamp = first.stat().st_mtime_ns
    assert native.build(tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporaries left behind


@needs_native
@pytest.mark.parametrize("out_features,in_features,group_size,asymmetric", [
    (576, 576, 64, False), (192, 576, 64, True), (40, 96, 32, True), (48, 1536, None, True),
    (130, 256, 128, False), (64, 512, 256, True)])
@pytest.mark.parametrize("rows", [1, 3, native.MAX_ROWS, native.MAX_ROWS + 1])
def test_q4_gemv_matches_direct_dequantization(out_features, in_features, group_size, asymmetric,
                                               rows):
    q, scale, zp = make_codes(out_features, in_features, 4, group_size, asymmetric)
    bias = torch.randn(out_features)
    layer = QuantizedLinear.from_quantized(q, scale, zp, 4, group_size, bias)
    x = torch.randn(rows, in_features)
    y = layer(x)
    assert layer.layout == "cpu_native" and y.dtype == torch.float32
    ref = x.double() @ direct_weight(q, scale, zp, group_size).double().t() + bias.double()
    assert rel_err(y, ref) < 1e-6
    assert torch.equal(layer.state_dict()["weight_packed"], layer.weight_packed)  # no conversion


@needs_native
def test_q4_gemv_keeps_batch_shape_and_dtype():
    q, scale, zp = make_codes(64, 128, 4, 64, True)
    layer = QuantizedLinear.from_quantized(q, scale, zp, 4, 64)
    x = torch.randn(2, 3, 128).bfloat16()
    y = layer(x)
    assert y.shape == (2, 3, 64) and y.dtype == torch.bfloat16
    ref = x.float().reshape(6, 128) @ direct_weight(q, scale, zp, 64).t()
    assert rel_err(y.float().reshape(6, 64), ref) < 4e-3  # one bf16 rounding of y


def test_unsupported_shapes_stay_off_the_gemv():
    assert not native.q4_supported(4, 48, 16, torch.bfloat16)  # group 16: not whole 32-code steps
    assert not native.q4_supported(4, 80, None, torch.bfloat16)  # in % 32
    assert not native.q4_supported(4, 128, 64, torch.float32)  # fp32 scales: the reference's
    assert not native.q4_supported(3, 128, 64, torch.bfloat16)


def test_quantize_rows_round_trip():
    w = torch.randn(50, 64) * torch.rand(50, 1) * 3
    codes, scale = quantize_rows(w)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == 127
    assert torch.equal(codes.abs().amax(1), torch.full((50,), 127, dtype=torch.int8))
    assert ((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 * (1 + 1e-6)).all()


@pytest.mark.parametrize("rows", [1, 5, native.MAX_ROWS + 3])
def test_int8_head_matches_dequantized_table(rows):
    table = Int8Embedding(torch.randn(300, 96))
    head = Int8Head(table)
    h = torch.randn(rows, 96)
    ref = h.double() @ table.dequantize().double().t()
    assert rel_err(head(h), ref) < 1e-6
    ids = torch.tensor([[0, 7, 299]])
    assert torch.equal(table(ids), table.dequantize()[ids])


def test_load_with_int8_embeddings(tiny_llama, tmp_path):
    """embedding_bits=8 halves the table's bytes, keeps tying, and moves logits by int8 rounding
    only: the same model with its embedding replaced by the dequantized int8 table agrees."""
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    export_model(tiny_llama, None, tmp_path / "e", dtype=torch.float32)
    plain = load_quantized(tmp_path / "e", dtype=torch.float32)
    small = load_quantized(tmp_path / "e", dtype=torch.float32, embedding_bits=8)
    assert small.get_output_embeddings().table is small.get_input_embeddings()  # tied: one table
    assert weight_bytes(plain)["other"] - weight_bytes(small)["other"] == 300 * 128 * 4 - (300 * 128 + 300 * 4)
    with torch.no_grad():
        plain.get_input_embeddings().weight.copy_(small.get_input_embeddings().dequantize())
        ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
        assert rel_err(small(ids).logits, plain(ids).logits) < 1e-5
    with pytest.raises(ValueError, match="embedding_bits=4"):
        load_quantized(tmp_path / "e", embedding_bits=4)


# ---- fused fake quantization ---------------------------------------------------------------------
@needs_native
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("size", [64, 576, 13])
def test_fused_fake_quant_is_bit_identical_to_torch(bits, symmetric, size):
    from qat.format.grid import qrange
    from qat.quant.ste import _ste_grads, fake_quant_values

    g = torch.Generator().manual_seed(bits * 100 + size)
    w = torch.randn(24, 3, size, generator=g)
    scale = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1)) * 0.8  # some weights clip
    zp = None if symmetric else torch.randint(-2, 3, (24, 3, 1), generator=g).float()
    w[0, 0, :4] = torch.tensor([0.5, 1.5, -0.5, 2.5]) * scale[0, 0]  # exact ties: half to even
    assert native.fake_quant_supported(w, scale, zp)
    ours = native.fake_quant(w, scale, zp, *qrange(bits))
    assert torch.equal(ours, fake_quant_values(w.clone(), scale, zp, bits))
    grad = torch.randn(w.shape, generator=g)
    expected = _ste_grads(grad.clone(), w, scale, zp, bits, True, False)[0]
    masked = native.mask_grad_(w, grad.clone(), scale, zp, *qrange(bits))
    assert torch.equal(masked, expected) and bool((masked == 0).any()) and bool((masked != 0).any())


@needs_native
def test_fake_quant_linear_gradients_unchanged_by_the_fused_kernel(monkeypatch):
    """Observer (fixed-scale) QAT: the fused path and the torch ops give identical y and grads."""
    from qat.quant.ste import fake_quant_linear

    g = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=g)
    scale = weight.view(96, 2, 64).abs().amax(-1, keepdim=True) / 7
    zp = torch.randint(-1, 2, (96, 2, 1), generator=g).float()
    x = torch.randn(5, 128, generator=g)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(native, "fake_quant_supported", lambda *a, fused=fused: fused)
        w, xx = weight.clone().requires_grad_(), x.clone().requires_grad_()
        y = fake_quant_linear(xx, w, scale, zp, None, 3)
        y.square().sum().backward()
        results.append((y.detach(), w.grad, xx.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@needs_native
@pytest.mark.parametrize("size", [64, 13, 8, 1])
def test_native_minmax_equals_amin_amax(size):
    from qat.quant.observers import minmax

    w = torch.randn(7, 5, size, generator=torch.Generator().manual_seed(size))
    w[1, 2, -1] = float("nan")  # torch propagates NaN: so must we, wherever it sits
    w[3, 0, 0] = float("nan")
    assert native.minmax_supported(w)
    lo, hi = native.minmax(w)
    expected = (w.amin(-1, keepdim=True), w.amax(-1, keepdim=True))
    for ours, theirs in zip((lo, hi), expected):
        assert ours.shape == theirs.shape
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.nan_to_num(), theirs.nan_to_num())
    assert torch.equal(minmax(w)[1].nan_to_num(), expected[1].nan_to_num())  # grid uses it
    assert not native.minmax_supported(w.to(torch.bfloat16))
    assert not native.minmax_supported(w.transpose(0, 1))


# ---- frozen codes (optim.trainable=scales) ----------------------------------------------------
@needs_native
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("size", [64, 18, 7])
def test_native_codes_are_the_torch_dequantization_bit_for_bit(bits, symmetric, size):
    """One pass over packed (two per byte) or int8 codes gives ste's torch ops exactly: the
    dequantized weight and dL/dw_hat * (q - zp), the product dL/dscale sums per group."""
    from qat.format.grid import qrange
    from qat.quant.ste import _dequantize_codes, code_values, pack_codes

    qmin, qmax = qrange(bits)
    g = torch.Generator().manual_seed(bits * 100 + size)
    q = torch.randint(qmin, qmax + 1, (9, 4, size), generator=g)
    packs = bits <= 4 and size % 2 == 0
    codes = pack_codes(q, qmin) if packs else q.to(torch.int8)
    assert codes.dtype == (torch.uint8 if packs else torch.int8)
    scale = torch.rand(9, 4, 1, generator=g) * 0.1 + 1e-3
    zp = None if symmetric else torch.randint(qmin, qmax + 1, (9, 4, 1), generator=g).float()
    assert native.codes_supported(codes, scale, zp)
    out = torch.full((9, 4, size), float("nan"))
    assert torch.equal(native.dequantize_codes(codes, scale, zp, qmin, out),
                       _dequantize_codes(codes, scale, zp, qmin))
    grad = torch.randn(9, 4, size, generator=g)
    values = code_values(codes, qmin) if zp is None else code_values(codes, qmin) - zp
    assert torch.equal(native.mul_codes_(grad.clone(), codes, zp, qmin), grad * values)
    with pytest.raises(ValueError, match="contiguous float32"):
        native.dequantize_codes(codes, scale, zp, qmin, torch.empty(9, 4, size + 2))
    assert not native.codes_supported(codes, scale.double(), zp)
    assert not native.codes_supported(codes.transpose(0, 1), scale, zp)
