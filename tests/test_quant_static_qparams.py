"""Static quantization parameters: set by PTQ, used instead of the observer, kept by checkpoints."""
import pytest
import torch
from torch import nn

from qat.ptq.rtn import rtn_qparams
from qat.quant import FakeQuantLinear, QuantConfig, WeightSpec, fake_quant_modules, prepare

SPECS = {
    "g32_asym": WeightSpec(bits=4, group_size=32, symmetric=False),
    "channel_ma": WeightSpec(bits=3, granularity="channel", group_size=None,
                             observer="moving_average"),
    "g64_lsq": WeightSpec(bits=4, group_size=64, learnable_scale=True),
}


def _clip_all(model, ratio=0.7):
    """Static grids that the observer would never produce (ranges clipped to 70%)."""
    for m in fake_quant_modules(model):
        m.weight_fake_quant.set_qparams(*rtn_qparams(m.weight, m.weight_fake_quant.spec, ratio))


@pytest.mark.parametrize("name", list(SPECS))
def test_static_qparams_round_trip_through_state_dict(tiny_llama, name):
    config = QuantConfig(weight=SPECS[name])
    state_before = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    prepare(tiny_llama, config)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        observed = tiny_llama(ids).logits
        _clip_all(tiny_llama)
        clipped = tiny_llama(ids).logits
    assert not torch.allclose(observed, clipped)
    fresh = type(tiny_llama)(tiny_llama.config).eval()
    fresh.load_state_dict(state_before)
    prepare(fresh, config)
    fresh.load_state_dict(tiny_llama.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, clipped)


@pytest.mark.parametrize("name", list(SPECS))
def test_quantized_and_dequantized_follow_static_qparams(name):
    spec = SPECS[name]
    layer = FakeQuantLinear.from_linear(nn.Linear(128, 16, bias=False), spec)
    fq = layer.weight_fake_quant
    scale, zp = rtn_qparams(layer.weight, spec, 0.6)
    fq.set_qparams(scale, zp)
    codes, s, z = fq.quantized(layer.weight)
    assert torch.equal(s, scale.squeeze(-1)) and torch.equal(z, zp.squeeze(-1))
    with torch.no_grad():
        forward = fq(layer.weight)
    assert torch.equal(fq.dequantized(layer.weight), forward)
    grouped_codes = codes.float().reshape(scale.shape[0], scale.shape[1], -1)
    assert torch.equal(((grouped_codes - zp) * scale).reshape(forward.shape), forward)


def test_static_grid_ignores_weight_changes_and_clears():
    spec = WeightSpec(bits=4, group_size=32)
    layer = FakeQuantLinear.from_linear(nn.Linear(64, 8, bias=False), spec)
    fq = layer.weight_fake_quant
    fq.set_qparams(*rtn_qparams(layer.weight, spec))
    fixed = fq.qparams(layer.weight)[0].clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    assert torch.equal(fq.qparams(layer.weight)[0], fixed)
    fq.clear_qparams()
    assert not fq.static and "scale" not in fq.state_dict()
    torch.testing.assert_close(fq.qparams(layer.weight)[0], 3 * fixed, rtol=1e-2, atol=0)


def test_set_qparams_rejects_wrong_shapes():
    layer = FakeQuantLinear.from_linear(nn.Linear(64, 8, bias=False), WeightSpec(group_size=32))
    with pytest.raises(ValueError, match="rows, groups, 1"):
        layer.weight_fake_quant.set_qparams(torch.ones(8, 2), torch.zeros(8, 2))
    layer.weight_fake_quant.set_qparams(torch.ones(8, 2, 1), torch.zeros(8, 2, 1))
    with pytest.raises(ValueError, match="differs"):
        layer.weight_fake_quant.set_qparams(torch.ones(8, 1, 1), torch.zeros(8, 1, 1))
