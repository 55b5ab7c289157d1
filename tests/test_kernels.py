"""Kernels against the plain-torch reference: dequantize, CPU int4/int8 fast path, QuantizedLinear, Triton.

Tolerances, and why. The reference computes in float32 from the same bf16-rounded input. torch's CPU
kernels accumulate in float32 and round y once to bf16, so |y - ref| <= 2^-8 |ref| plus a little
accumulation-order slack (2^-10 max|ref|). The int8 kernel has no zero term: for asymmetric weights
x @ (q * scale).T is rounded before zp * scale is subtracted, so its bound is relative to that term.
Triton runs under TRITON_INTERPRET=1 in a subprocess (the variable must be set before triton is
imported); GPU tests skip without CUDA.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat.format.pack import pack
from qat.kernels import QuantizedLinear, dequantize_weight, linear_reference, triton_available
from qat import native
from qat.kernels import cpu

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROOT = Path(__file__).resolve().parents[1]


def make_codes(out_features, in_features, bits, group_size, asymmetric, seed=0):
    """Random codes, bf16-representable scales and integer zero points, as the fake quantizer gives."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if group_size is None else in_features // group_size
    q = torch.randint(lo, hi + 1, (out_features, in_features), generator=g)
    scale = (torch.rand(out_features, groups, generator=g) * 0.02 + 1e-3).bfloat16().float()
    zp = torch.randint(lo, hi + 1, (out_features, groups), generator=g).float() if asymmetric else None
    return q, scale, zp


def direct_weight(q, scale, zp, group_size):
    """(q - zp) * scale by reshaping into groups: independent of the reference's repeat_interleave."""
    out_features, in_features = q.shape
    gs = in_features if group_size is None else group_size
    grouped = q.float().view(out_features, -1, gs)
    if zp is not None:
        grouped = grouped - zp[..., None]
    return (grouped * scale[..., None]).view(out_features, in_features)


def assert_bf16_close(y, ref, extra=0.0):
    """|y - ref| <= 2^-8 |ref| (one bf16 rounding) + 2^-10 max|ref| (summation order) + extra, elementwise."""
    err = (y.float() - ref).abs()
    bound = 2 ** -8 * ref.abs() + 2 ** -10 * ref.abs().max() + extra
    worst = (err - bound).argmax()
    assert bool((err <= bound).all()), f"err {err.flatten()[worst]:.3e} > bound {bound.flatten()[worst]:.3e}"


def zero_term_rounding(x, scale, zp):
    """Bound on x @ (rounding of -zp * scale to bf16).T, the int4 kernel's zero term: 2^-9 per weight."""
    if zp is None:
        return 0.0
    x_sums = x.float().view(x.shape[0], zp.shape[1], -1).sum(-1).abs()
    return 2 ** -9 * x_sums @ (zp * scale).abs().t()


def bound_args(x, bits, q, scale, zp, group_size, bias=None):
    """Tolerance beyond one rounding for the CPU kernels, which round x @ W.T to bf16 inside."""
    extra = 0.0
    if bias is not None:  # rounded before the bias is added, rounded again after
        extra = 2 ** -8 * (x.float() @ direct_weight(q, scale, zp, group_size).t()).abs()
    if zp is None:
        return {"extra": extra}
    if bits == 8:  # x @ (q * scale).T is rounded to bf16, then zp * scale subtracted, then rounded again
        return {"extra": extra + 2 ** -8 * (x.float() @ direct_weight(q, scale, None, group_size).t()).abs()}
    return {"extra": extra + zero_term_rounding(x, scale, zp)}


# ---- reference ------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("group_size", [32, 64, None])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_reference_matches_direct_float(bits, group_size, asymmetric):
    q, scale, zp = make_codes(24, 128, bits, group_size, asymmetric)
    w = dequantize_weight(pack(q, bits), scale, zp, bits, group_size, 128)
    assert torch.equal(w, direct_weight(q, scale, zp, group_size))
    x = torch.randn(3, 128, dtype=torch.float64)
    bias = torch.randn(24)
    y = linear_reference(x.float(), pack(q, bits), scale, zp, bits, group_size, 128, bias)
    torch.testing.assert_close(y.double(), x @ w.double().t() + bias.double(), rtol=1e-5, atol=1e-5)
    y_bf16 = linear_reference(x.bfloat16(), pack(q, bits), scale, zp, bits, group_size, 128)
    assert y_bf16.dtype == torch.bfloat16


# ---- CPU fast path ----------------------------------------------------------------------------------
CPU_CASES = [  # bits, group_size, asymmetric, out, in
    (4, 64, False, 576, 576), (4, 64, True, 192, 576), (4, 32, True, 48, 96), (4, 128, False, 64, 256),
    (4, 256, True, 32, 512), (4, None, False, 48, 576), (4, None, True, 16, 96),
    (8, None, False, 576, 1536), (8, None, True, 48, 48),
    (8, None, True, 48, 40),  # K % 16 != 0: torch's int8 kernel crashes on AVX-512, so not used
]


def expected_layout(bits: int, group_size: int | None, in_features: int, backend: str = "auto") -> str:
    """auto: our GEMV for 4 bits where it runs; torch's kernels otherwise (int8 per-channel only)."""
    if backend == "auto" and native.available() and native.q4_supported(bits, in_features, group_size,
                                                                         torch.bfloat16):
        return "cpu_native"
    int8 = group_size is None and in_features % 16 == 0
    return {4: "cpu_int4", 8: "cpu_int8" if int8 else "canonical"}.get(bits, "canonical")


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("bits,group_size,asymmetric,out_features,in_features", CPU_CASES)
def test_cpu_fast_path_matches_reference(bits, group_size, asymmetric, out_features, in_features,
                                         backend):
    q, scale, zp = make_codes(out_features, in_features, bits, group_size, asymmetric)
    layer = QuantizedLinear.from_quantized(q, scale, zp, bits, group_size)
    layer.backend = backend
    packed = layer.weight_packed.clone()
    for m in (1, 7, 33):
        x = torch.randn(m, in_features).bfloat16()
        y = layer(x)
        assert layer.layout == expected_layout(bits, group_size, in_features, backend)
        assert y.dtype == torch.bfloat16
        ref = linear_reference(x.float(), packed, scale, zp, bits, group_size, in_features)
        assert_bf16_close(y, ref, **bound_args(x, bits, q, scale, zp, group_size))


def test_cpu_int4_kernel_convention():
    """torch computes x @ ((u - 8) * scale + zero).T with u the unsigned nibble: probe it directly."""
    u = torch.randint(0, 16, (32, 64), dtype=torch.int32)
    sz = torch.stack((torch.rand(2, 32) + 0.5, torch.randn(2, 32)), dim=-1).bfloat16()
    scale, zero = (sz[..., i].float().t().repeat_interleave(32, 1) for i in (0, 1))
    w = (u - 8) * scale + zero
    x = torch.randn(3, 64).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x, torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, cpu.INNER_K_TILES), 32, sz)
    assert_bf16_close(y, x.float() @ w.t())


@pytest.mark.parametrize("out_features,in_features", [(16, 64), (48, 96), (80, 576)])
def test_cpu_int4_layout_restores_exactly(out_features, in_features):
    q, scale, zp = make_codes(out_features, in_features, 4, 32, True)
    packed = pack(q, 4)
    weight, scale_zeros, group = cpu.prepare_int4(packed, scale.bfloat16(), zp, in_features, 32)
    restored, restored_scale = cpu.restore_int4(weight, scale_zeros, in_features, 32)
    assert torch.equal(restored, packed) and torch.equal(restored_scale, scale.bfloat16())


def test_cpu_constraints_and_fallback():
    assert cpu.int4_kernel_group(40, 128, 64) is None  # out % 16
    assert cpu.int4_kernel_group(48, 96, 16) is None  # group not in {32, 64, 128, 256}
    assert cpu.int4_kernel_group(48, 576, None) == 64  # per-channel: largest group dividing in
    assert not cpu.int8_supported(44, None) and not cpu.int8_supported(64, 32)
    q, scale, zp = make_codes(40, 128, 4, 64, False)
    layer = QuantizedLinear.from_quantized(q, scale, zp, 4, 64)
    layer.backend = "torch"  # our GEMV takes any out_features; torch's int4 kernel does not
    x = torch.randn(2, 128).bfloat16()
    assert torch.equal(layer(x), linear_reference(x, pack(q, 4), scale, zp, 4, 64, 128))
    assert layer.layout == "canonical"


# ---- QuantizedLinear ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_quantized_linear_forward(bits, group_size, asymmetric):
    q, scale, zp = make_codes(48, 256, bits, group_size, asymmetric)
    bias = torch.randn(48)
    layer = QuantizedLinear.from_quantized(q, scale, zp, bits, group_size, bias)
    w = direct_weight(q, scale, zp, group_size)
    for shape in [(1, 256), (3, 256), (2, 5, 256)]:
        x = torch.randn(shape).bfloat16()
        y = layer(x)
        assert y.shape == (*shape[:-1], 48) and y.dtype == torch.bfloat16
        x2 = x.reshape(-1, 256)
        ref = x2.float() @ w.t() + bias
        kernel = layer.layout != "canonical"  # the fallback is the reference itself: one rounding
        tolerance = bound_args(x2, bits, q, scale, zp, group_size, bias) if kernel else {}
        assert_bf16_close(y.reshape(-1, 48), ref, **tolerance)
    assert layer.layout == expected_layout(bits, group_size, 256)


@pytest.mark.parametrize("bits,group_size,asymmetric", [(4, 64, True), (4, None, False), (8, None, True)])
def test_state_dict_is_canonical_after_prepare(bits, group_size, asymmetric):
    q, scale, zp = make_codes(48, 192, bits, group_size, asymmetric)
    layer = QuantizedLinear.from_quantized(q, scale, zp, bits, group_size, torch.randn(48))
    layer.backend = "torch"  # the layouts that convert (our GEMV reads the canonical words)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    canonical_bytes = layer.weight_bytes()
    layer.prepare()
    assert layer.layout != "canonical"
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # the CPU layout replaces the packed words; int4 holds (scale, zero) pairs per kernel group instead
    zp_bytes = 0 if zp is None else zp.numel()
    assert canonical_bytes == 48 * 192 * bits // 8 + scale.numel() * 2 + zp_bytes
    held = 48 * 192 // 2 + 2 * 2 * 48 * 192 // layer.kernel_group if bits == 4 else 48 * 192 + 48 * 2
    assert layer.weight_bytes() == held + zp_bytes < 48 * 192 * 2 * bits / 16 * 1.2
    fresh = QuantizedLinear.from_quantized(torch.zeros_like(q), scale, zp, bits, group_size, torch.zeros(48))
    fresh.backend = "torch"
    fresh.prepare()
    fresh.load_state_dict(after)
    x = torch.randn(4, 192).bfloat16()
    assert torch.equal(fresh(x), layer(x))
    layer.to(torch.float32)  # any module move sees the canonical layout first
    assert layer.layout == "canonical" and torch.equal(layer.weight_packed, before["weight_packed"])


def test_reference_backend_is_exact():
    q, scale, zp = make_codes(48, 128, 4, 64, True)
    layer = QuantizedLinear.from_quantized(q, scale, zp, 4, 64)
    x = torch.randn(3, 128).bfloat16()
    layer(x)  # prepared for the int4 kernel
    layer.backend = "reference"
    assert torch.equal(layer(x), linear_reference(x, pack(q, 4), scale, zp, 4, 64, 128))
    assert layer.layout == "canonical"


def test_rejects_unrounded_scales_and_bad_shapes():
    q, scale, _ = make_codes(16, 64, 4, 32, False)
    with pytest.raises(ValueError, match="bf16"):
        QuantizedLinear.from_quantized(q, scale + 1e-7, None, 4, 32)
    with pytest.raises(ValueError, match="weight_scale"):
        QuantizedLinear(pack(q, 4), scale[:, :1].bfloat16(), None, 64, 4, 32)


def test_kernels_import_with_torch_only():
    code = ("import sys, qat.kernels, qat.format.pack; "
            "heavy = {'triton', 'transformers', 'hydra', 'lightning', 'datasets', 'wandb'}; "
            "loaded = heavy & {m.split('.')[0] for m in sys.modules}; assert not loaded, loaded")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


# ---- Triton ----------------------------------------------------------------------------------------------
needs_interpreter = pytest.mark.skipif(not (INTERPRET and triton_available()),
                                       reason="runs in the TRITON_INTERPRET=1 subprocess below")
TRITON_CASES = [  # bits, group_size, asymmetric, in_features
    (4, 128, True, 384), (4, 64, False, 384), (4, 32, True, 384), (4, None, True, 100), (8, None, False, 384),
    (8, 128, True, 384), (2, 64, True, 384),
]
CONFIGS = [  # (config, M): GEMV rows, split-K with atomics, a K tile wider than the row's last words
    (dict(BLOCK_M=1, BLOCK_N=16, BLOCK_KW=16, SPLIT_K=2), 3),
    (dict(BLOCK_M=16, BLOCK_N=32, BLOCK_KW=16, SPLIT_K=3), 1),
    (dict(BLOCK_M=16, BLOCK_N=16, BLOCK_KW=32, SPLIT_K=1), 5),
]


@needs_interpreter
@pytest.mark.parametrize("bits,group_size,asymmetric,in_features", TRITON_CASES)
def test_interpreted_triton_matches_reference(bits, group_size, asymmetric, in_features):
    from qat.kernels.triton_linear import launch

    q, scale, zp = make_codes(40, in_features, bits, group_size, asymmetric)
    packed, scale_bf16 = pack(q, bits), scale.bfloat16()
    zp8 = None if zp is None else zp.to(torch.int8)
    transposed = packed.t().contiguous().t()  # same words, stored (KW, N): strides are honoured
    for (config, m), words in zip(CONFIGS, (packed, packed, transposed)):
        x = torch.randn(m, in_features)
        y = launch(x, words, scale_bf16, zp8, bits, group_size or -1, in_features, config=config)
        ref = linear_reference(x, packed, scale, zp, bits, group_size, in_features)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    xb = torch.randn(2, 3, in_features).bfloat16()  # bf16 in, bf16 out, autotuned entry point
    y = torch.ops.qat.quantized_linear(xb, packed, scale_bf16, zp8, bits, group_size or -1, in_features)
    assert y.shape == (2, 3, 40) and y.dtype == torch.bfloat16
    assert_bf16_close(y, linear_reference(xb.float(), packed, scale, zp, bits, group_size, in_features))


@needs_interpreter
def test_interpreted_custom_op_fake_and_schema():
    from qat.kernels import triton_linear  # noqa: F401  (registers the op)

    q, scale, zp = make_codes(16, 128, 4, 64, True)
    args = (torch.randn(2, 128), pack(q, 4), scale.bfloat16(), zp.to(torch.int8), 4, 64, 128)
    torch.library.opcheck(torch.ops.qat.quantized_linear.default, args,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter run")
def test_triton_in_interpreter_subprocess():
    pytest.importorskip("triton")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "interpreted"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-500:]


@pytest.mark.skipif(INTERPRET or not triton_available(), reason="needs triton, not its interpreter")
@pytest.mark.parametrize("config", [(1, 32, 16, 2, 4), (16, 64, 16, 2, 4), (64, 64, 32, 1, 8)])
def test_triton_compiles_for_sm90_without_a_gpu(config):
    """The interpreter accepts code the compiler rejects: compile GEMV, in-group and per-element paths."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from qat.kernels.triton_linear import quantized_linear_kernel

    block_m, block_n, block_kw, split_k, warps = config
    pointers = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*bf16", "z_ptr": "*i8", "out_ptr": "*fp32"}
    ints = ["M", "N", "K", "KW", "stride_xm", "stride_wn", "stride_wk", "stride_sn", "stride_zn",
            "stride_om", "M_BUCKET"]
    constants = dict(BITS=4, GROUP_WORDS=16, HAS_ZP=True, FP32_DOT=False, BLOCK_M=block_m, BLOCK_N=block_n,
                     BLOCK_KW=block_kw, SPLIT_K=split_k)
    signature = {**pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constants}}
    try:
        source = ASTSource(fn=quantized_linear_kernel, signature=signature, constexprs=constants)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
    except (ImportError, RuntimeError, FileNotFoundError) as err:  # no ptxas, or another triton API
        pytest.skip(f"cannot compile for sm_90 here: {err}")
    assert compiled.asm["cubin"]


@pytest.mark.skipif(not (torch.cuda.is_available() and triton_available()) or INTERPRET,
                    reason="needs a CUDA GPU and triton")
@pytest.mark.parametrize("bits,group_size,asymmetric", [(4, 128, False), (4, 128, True), (8, None, False)])
def test_gpu_quantized_linear_matches_reference(bits, group_size, asymmetric):
    q, scale, zp = make_codes(256, 512, bits, group_size, asymmetric)
    layer = QuantizedLinear.from_quantized(q, scale, zp, bits, group_size).cuda()
    for m in (1, 16, 100):
        x = torch.randn(m, 512, device="cuda").bfloat16()
        zp_cuda = None if zp is None else zp.cuda()
        ref = linear_reference(x.float(), layer.weight_packed, scale.cuda(), zp_cuda, bits, group_size, 512)
        # the dequantized tile is rounded to bf16 before tl.dot: one more 2^-8 relative term per weight
        torch.testing.assert_close(layer(x).float(), ref, rtol=2e-2, atol=1e-2 * ref.abs().max().item())
