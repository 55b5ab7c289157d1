"""Gradients: the straight-through estimator and the LSQ scale gradient, against their formulas."""
import math

import pytest
import torch

from qat.format.grid import qrange
from qat.quant import WeightSpec
from qat.quant.fake_quant import FakeQuantActivation, FakeQuantWeight
from qat.quant.spec import ActivationSpec
from qat.quant.ste import fake_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zp_value", [0.0, 1.0])
def test_ste_is_identity_inside_clip_range_and_zero_outside(bits, zp_value):
    torch.manual_seed(bits)
    qmin, qmax = qrange(bits)
    scale = torch.full((4, 2, 1), 0.05)
    zp = torch.full((4, 2, 1), zp_value)
    x = (torch.randn(4, 2, 16) * 0.05 * qmax * 1.5).requires_grad_()  # some beyond the range
    upstream = torch.randn(4, 2, 16)
    fake_quantize(x, scale, zp, bits).backward(upstream)
    v = x.detach() / scale + zp
    inside = (v >= qmin) & (v <= qmax)
    assert inside.any() and (~inside).any()
    torch.testing.assert_close(x.grad, upstream * inside, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("zp_value", [0.0, -1.0])
def test_scale_gradient_matches_lsq_formula(bits, zp_value):
    torch.manual_seed(10 + bits)
    qmin, qmax = qrange(bits)
    scale = (torch.rand(3, 4, 1) * 0.05 + 0.02).requires_grad_()
    zp = torch.full((3, 4, 1), zp_value)
    x = torch.randn(3, 4, 8) * 0.04 * qmax
    upstream = torch.randn(3, 4, 8)
    fake_quantize(x, scale, zp, bits).backward(upstream)
    v = x / scale.detach() + zp
    # d w_hat / d s per element (Esser et al.): round(v) - v inside, qmin - zp / qmax - zp outside.
    local = torch.where(v < qmin, qmin - zp, torch.where(v > qmax, qmax - zp, torch.round(v) - v))
    want = (upstream * local).sum(-1, keepdim=True)
    torch.testing.assert_close(scale.grad, want, rtol=1e-5, atol=1e-6)


def test_scale_gradient_equals_autograd_of_plain_formula():
    """Independent check: autograd through the textbook STE formulation gives the same grads."""
    torch.manual_seed(0)
    bits, (qmin, qmax) = 3, qrange(3)
    x = (torch.randn(5, 2, 16)).requires_grad_()
    s = (torch.rand(5, 2, 1) * 0.3 + 0.1).requires_grad_()
    zp = torch.full((5, 2, 1), 1.0)
    upstream = torch.randn(5, 2, 16)
    fake_quantize(x, s, zp, bits).backward(upstream)
    got_x, got_s = x.grad.clone(), s.grad.clone()
    x.grad = s.grad = None
    v = torch.clamp(x / s + zp, qmin, qmax)
    q = v + (torch.round(v) - v).detach()
    ((q - zp) * s).backward(upstream)
    torch.testing.assert_close(got_x, x.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_s, s.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("granularity,group_size", [("group", 16), ("channel", None), ("tensor", None)])
def test_learnable_scale_gets_lsq_gradient_scaling(granularity, group_size):
    """The module scales the scale gradient by g = 1 / sqrt(N * qmax), N elements per scale."""
    torch.manual_seed(1)
    bits = 4
    w = torch.randn(6, 32)
    spec = WeightSpec(bits=bits, granularity=granularity, group_size=group_size,
                      learnable_scale=True, scale_dtype="float32")
    fq = FakeQuantWeight(spec, w)
    with torch.no_grad():
        fq.scale.mul_(0.8)  # move inside the range so both regimes appear
    upstream = torch.randn(6, 32)
    fq(w).backward(upstream)
    grouped, s = fq._grouped(w), fq.scale.detach()
    n = grouped.shape[-1] if granularity != "tensor" else w.numel()
    qmin, qmax = qrange(bits)
    v = grouped / s
    local = torch.where(v < qmin, torch.full_like(v, qmin),
                        torch.where(v > qmax, torch.full_like(v, qmax), torch.round(v) - v))
    want = (fq._grouped(upstream) * local).sum(-1, keepdim=True) / math.sqrt(n * qmax)
    torch.testing.assert_close(fq.scale.grad, want, rtol=1e-5, atol=1e-7)


def test_observer_scales_are_constants_for_the_weight_gradient():
    torch.manual_seed(2)
    w = torch.randn(4, 32, requires_grad=True)
    fq = FakeQuantWeight(WeightSpec(bits=4, group_size=16))
    upstream = torch.randn(4, 32)
    fq(w).backward(upstream)
    # min/max grids contain every weight except a symmetric grid's clipped top code.
    inside = fq._grouped(w.detach()) / fq.qparams(w.detach())[0] <= qrange(4)[1]
    torch.testing.assert_close(w.grad, (fq._grouped(upstream) * inside).reshape(4, 32))


def test_disabled_quantizers_are_identity():
    w = torch.randn(4, 32)
    fq = FakeQuantWeight(WeightSpec())
    fq.enabled = False
    assert torch.equal(fq(w), w)
    act = FakeQuantActivation(ActivationSpec())
    act.enabled = False
    assert torch.equal(act(w), w)


def test_dynamic_per_token_activation_quantization():
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64) * torch.rand(2, 5, 1) * 10
    out = FakeQuantActivation(ActivationSpec(bits=8))(x)
    for row_in, row_out in zip(x.reshape(-1, 64), out.reshape(-1, 64)):
        scale = row_in.abs().max() / 127.5
        torch.testing.assert_close(row_out, torch.clamp(torch.round(row_in / scale), -128, 127) * scale,
                                   rtol=0, atol=0)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity, group_size", [("group", 16), ("channel", None),
                                                     ("tensor", None)])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("learnable", [False, True])
def test_fused_linear_matches_unfused_values_and_gradients(bits, granularity, group_size,
                                                           symmetric, learnable):
    """FakeQuantLinear's fused path equals F.linear(x, fake_quantize(w)) in values and grads."""
    import torch.nn.functional as F

    from qat.quant import FakeQuantLinear, WeightSpec

    torch.manual_seed(bits)
    linear = torch.nn.Linear(32, 12, bias=True)
    spec = WeightSpec(bits=bits, granularity=granularity, group_size=group_size,
                      symmetric=symmetric, learnable_scale=learnable)
    layer = FakeQuantLinear.from_linear(linear, spec)
    x = torch.randn(3, 5, 32, requires_grad=True)
    fused = layer(x)
    fused.square().sum().backward()
    grads = [t.grad.clone() for t in (x, layer.weight, layer.bias)]
    scale_grad = layer.weight_fake_quant.scale.grad.clone() if learnable else None
    for t in (x, layer.weight, layer.bias):
        t.grad = None
    if learnable:
        layer.weight_fake_quant.scale.grad = None
    plain = F.linear(x, layer.weight_fake_quant(layer.weight), layer.bias)
    plain.square().sum().backward()
    torch.testing.assert_close(fused, plain, rtol=0, atol=1e-6)
    for got, want in zip(grads, (x.grad, layer.weight.grad, layer.bias.grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if learnable:
        torch.testing.assert_close(scale_grad, layer.weight_fake_quant.scale.grad,
                                   rtol=1e-4, atol=1e-6)


def test_fused_linear_keeps_no_fake_quantized_weight_for_backward():
    from qat.quant import FakeQuantLinear, WeightSpec

    layer = FakeQuantLinear.from_linear(torch.nn.Linear(256, 128, bias=False),
                                        WeightSpec(bits=4, group_size=64))
    x = torch.randn(2, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    full_size = [t for t in saved if t.numel() == layer.weight.numel()
                 and t.untyped_storage().data_ptr() != layer.weight.untyped_storage().data_ptr()]
    assert not full_size  # only x, the weight Parameter itself and the small scales
