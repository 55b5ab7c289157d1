"""GPTQ against a plain column-by-column reference, and quantize_model end to end on tiny_llama."""
import copy

import pytest
import torch
from torch import nn

from qat.format.grid import compute_qparams, dequantize, quantize
from qat.export.load import load_quantized
from qat.export.writer import export_model
from qat.ptq import PTQSpec, gptq_quantize, kl_to_float, quantize_model, rtn_qparams
from qat.ptq.apply import write_layer
from qat.ptq.rtn import fake_quant, grouped
from qat.quant import FakeQuantLinear, QuantConfig, WeightSpec, prepare

GROUP = WeightSpec(bits=3, group_size=32)
SPECS = {
    "g32_sym": GROUP,
    "g32_asym": WeightSpec(bits=4, group_size=32, symmetric=False),
    "channel": WeightSpec(bits=3, granularity="channel", group_size=None),
    "tensor": WeightSpec(bits=4, granularity="tensor", group_size=None),
}


def _correlated(n=512, features=128, seed=0):
    """Inputs whose features are strongly correlated: where GPTQ's error feedback pays off."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features ** 0.5
    mix += torch.eye(features) * 0.3
    return torch.randn(n, 32, generator=g) @ torch.randn(32, features, generator=g) \
        + 0.3 * torch.randn(n, features, generator=g) @ mix


def _problem(seed=0, out=48):
    x = _correlated(seed=seed)
    w = torch.randn(out, x.shape[1], generator=torch.Generator().manual_seed(seed + 1)) * 0.1
    return w, x, 2 * x.T @ x / x.shape[0]


def _reference_gptq(w, h, spec, damp=0.01, act_order=False):
    """Frantar et al., one column at a time, no lazy batching, static groups under act_order."""
    w, h = w.clone().double(), h.clone().double()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    cols = w.shape[1]
    static = [t.double() for t in rtn_qparams(w, spec)]
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(cols)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(cols, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    q_all = torch.zeros_like(w)
    gs = spec.group_size if spec.granularity == "group" else cols
    for j in range(cols):
        g = int(perm[j]) // gs if spec.granularity == "group" else 0
        if spec.granularity == "group" and not act_order and j % gs == 0:
            cur = w[:, j:j + gs]
            s, z = compute_qparams(cur.amin(1), cur.amax(1), spec.bits, spec.symmetric,
                                   spec.scale_dtype)
            static[0][:, g, 0], static[1][:, g, 0] = s, z
        s, z = static[0][:, g, 0], static[1][:, g, 0]
        q = dequantize(quantize(w[:, j], s, z, spec.bits), s, z)
        err = (w[:, j] - q) / u[j, j]
        w[:, j:] -= err[:, None] * u[j, j:][None, :]
        q_all[:, j] = q
    return q_all[:, torch.argsort(perm)].float()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("name", list(SPECS))
def test_gptq_matches_column_by_column_reference(name, act_order):
    w, _, h = _problem()
    h[7, :] = h[:, 7] = 0  # a dead input feature
    result = gptq_quantize(w, h, SPECS[name], block_size=40, act_order=act_order)
    expected = _reference_gptq(w, h, SPECS[name], act_order=act_order)
    torch.testing.assert_close(result.weight, expected, rtol=0, atol=1e-5)
    assert torch.all(result.weight[:, 7] == 0)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_rtn_on_calibration_outputs(bits, act_order):
    w, x, h = _problem(seed=3)
    spec = WeightSpec(bits=bits, group_size=32)
    gptq = gptq_quantize(w, h, spec, act_order=act_order).weight
    rtn = fake_quant(w, spec)
    mse = lambda q: (x @ (w - q).T).square().mean().item()  # noqa: E731
    assert mse(gptq) < 0.8 * mse(rtn)


@pytest.mark.parametrize("name", ["g32_sym", "g32_asym", "channel"])
def test_gptq_weight_is_on_its_grid_and_is_the_fake_quant_forward(name):
    spec = SPECS[name]
    w, x, h = _problem(seed=5)
    result = gptq_quantize(w, h, spec, act_order=True)
    q = quantize(grouped(result.weight, spec), result.scale, result.zero_point, spec.bits)
    assert torch.equal(dequantize(q, result.scale, result.zero_point).reshape(w.shape),
                       result.weight)
    layer = FakeQuantLinear.from_linear(nn.Linear(128, 48, bias=False), spec)
    write_layer(layer, result.weight, result.scale, result.zero_point)
    assert torch.equal(layer.weight_fake_quant(layer.weight), result.weight)
    assert torch.equal(layer(x), x @ result.weight.T)
    codes, scale, zp = layer.weight_fake_quant.quantized(layer.weight)
    assert torch.equal(scale, result.scale.squeeze(-1)) and torch.equal(codes.float(), q.reshape(w.shape))


@pytest.fixture
def peaked(tiny_llama):
    with torch.no_grad():
        for p in tiny_llama.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    return tiny_llama


def _ids(n=16, t=48, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _ptq(model, method, spec=GROUP, **options):
    model = copy.deepcopy(model)
    prepare(model, QuantConfig(weight=spec))
    report = quantize_model(model, method, _ids(), batch_size=8, progress=False, **options)
    return model, report


def test_gptq_model_has_lower_calibration_loss_than_rtn(peaked):
    rtn, _ = _ptq(peaked, "rtn")
    gptq, report = _ptq(peaked, "gptq")
    assert len(report.layers) == 14 and report.samples == 16
    kl_rtn, kl_gptq = (kl_to_float(m, _ids(), reference=peaked) for m in (rtn, gptq))
    assert kl_gptq < 0.8 * kl_rtn


@pytest.mark.parametrize("method,spec", [("gptq", GROUP),
                                         ("awq", WeightSpec(bits=4, group_size=32, symmetric=False)),
                                         ("gptq", WeightSpec(bits=4, granularity="channel",
                                                             group_size=None))])
def test_ptq_model_exports_and_reloads_equal(peaked, tmp_path, method, spec):
    model, _ = _ptq(peaked, method, spec, act_order=True)
    ids = _ids(2, 24, seed=9)
    with torch.no_grad():
        trained = model(ids).logits
    export_model(model, None, tmp_path / "e", dtype=torch.float32)
    served = load_quantized(tmp_path / "e", dtype=torch.float32, backend="reference")
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, trained, rtol=1e-5, atol=1e-5)


def test_static_grid_survives_reobservation(peaked):
    """After GPTQ, the grid is GPTQ's, not the min-max of the GPTQ weight."""
    model, _ = _ptq(peaked, "gptq")
    layer = model.model.layers[1].mlp.down_proj
    fq = layer.weight_fake_quant
    assert fq.static
    observed = rtn_qparams(layer.weight, fq.spec)[0]
    assert not torch.equal(observed, fq.qparams(layer.weight)[0])


@pytest.mark.parametrize("field,value", [("method", "foo"), ("damp", 0.0), ("damp", -1),
                                         ("batch_size", 0), ("calibration_samples", 1.5),
                                         ("act_order", "yes"), ("awq_max_shrink", 1.5),
                                         ("smoothquant_alpha", 2.0), ("awq_grid", 0)])
def test_bad_ptq_spec_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ptq\.{field}="):
        PTQSpec(**{field: value})


def test_quantize_model_needs_prepare_and_calibration(tiny_llama):
    with pytest.raises(ValueError, match="prepare"):
        quantize_model(tiny_llama, "gptq", _ids())
    prepare(tiny_llama, QuantConfig(weight=GROUP))
    with pytest.raises(ValueError, match="calibration"):
        quantize_model(tiny_llama, "gptq", None)
