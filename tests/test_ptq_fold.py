"""AWQ and SmoothQuant: scale folding keeps the float function; AWQ lowers the quantization damage."""
import copy

import pytest
import torch

from qat.format.grid import dequantize, quantize
from qat.ptq import kl_to_float, quantize_model
from qat.ptq.awq import clip_qparams, output_error
from qat.ptq.calibrate import batched_forward, collect_input_stats
from qat.ptq.rtn import fake_quant, grouped, rtn_qparams
from qat.quant import QuantConfig, WeightSpec, prepare, set_fake_quant_enabled

SPEC = WeightSpec(bits=3, group_size=32)


def _ids(n=16, t=48, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def _salient(model):
    """Plant a few strong input channels (as real LLMs have) so scaling has something to do."""
    with torch.no_grad():
        for block in model.model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[[3, 40, 99]] *= 8.0
            for p in block.parameters():
                if p.ndim == 2:
                    p.mul_(4.0)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _mha(tiny_llama):
    """The same tiny model without grouped-query attention, so v -> o is folded too."""
    from transformers import LlamaForCausalLM
    config = copy.deepcopy(tiny_llama.config)
    config.num_key_value_heads = config.num_attention_heads
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("method", ["awq", "smoothquant"])
@pytest.mark.parametrize("gqa", [True, False])
def test_scaling_keeps_the_float_model(tiny_llama, method, gqa):
    model = _salient(tiny_llama if gqa else _mha(tiny_llama))
    ids = _ids(2, 32, seed=4)
    before = _logits(model, ids)
    norm_before = model.model.layers[0].input_layernorm.weight.clone()
    prepare(model, QuantConfig(weight=SPEC))
    report = quantize_model(model, method, _ids(), progress=False)
    assert len(report.groups) == 2 * (3 if gqa else 4)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm_before)
    set_fake_quant_enabled(model, False)
    torch.testing.assert_close(_logits(model, ids), before, rtol=0, atol=1e-4)


def test_awq_has_lower_calibration_loss_than_rtn(tiny_llama):
    model = _salient(tiny_llama)
    kl = {}
    for method in ("rtn", "awq"):
        m = copy.deepcopy(model)
        prepare(m, QuantConfig(weight=SPEC))
        quantize_model(m, method, _ids(), progress=False)
        kl[method] = kl_to_float(m, _ids(), reference=model)
    assert kl["awq"] < 0.9 * kl["rtn"]


def _qkv_input_spread(model, ids):
    """max / median over channels of the per-channel absmax of layer 0's attention input."""
    stats = collect_input_stats(model.model.layers[0], batched_forward(model, ids, 8))
    a = stats["self_attn.q_proj"].abs_max
    return (a.max() / a.median()).item()


def test_smoothquant_flattens_activation_outliers(tiny_llama):
    model = _salient(tiny_llama)
    prepare(model, QuantConfig(weight=SPEC))
    spread_before = _qkv_input_spread(model, _ids())
    w_before = model.model.layers[0].self_attn.q_proj.weight.abs().amax(0).clone()
    quantize_model(model, "smoothquant", _ids(), progress=False, smoothquant_alpha=0.5)
    w_after = model.model.layers[0].self_attn.q_proj.weight.abs().amax(0)
    assert _qkv_input_spread(model, _ids()) < 0.5 * spread_before
    # the planted channels' weight columns take over the magnitude
    assert (w_after[[3, 40, 99]] / w_before[[3, 40, 99]]).min() > (w_after / w_before).median()


@pytest.mark.parametrize("spec", [SPEC, WeightSpec(bits=4, group_size=32, symmetric=False),
                                  WeightSpec(bits=3, granularity="channel", group_size=None),
                                  WeightSpec(bits=4, granularity="tensor", group_size=None)])
def test_clipping_never_increases_output_error(spec):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 64, generator=g) * torch.linspace(0.2, 3.0, 64)
    w = torch.randn(16, 64, generator=g)
    w[:, 5] *= 6  # a heavy column that min-max ranges stretch for
    gram = x.T @ x / x.shape[0]
    scale, zp = clip_qparams(w, spec, gram)
    clipped = dequantize(quantize(grouped(w, spec), scale, zp, spec.bits), scale, zp)
    err_clip = output_error(w - clipped.reshape(w.shape), gram)
    err_rtn = output_error(w - fake_quant(w, spec), gram)
    assert err_clip <= err_rtn
    assert torch.all(scale <= rtn_qparams(w, spec)[0])
