"""prepare / unprepare on a real (tiny) transformers model."""
import pytest
import torch
from torch import nn

from qat.quant import FakeQuantLinear, QuantConfig, WeightSpec, prepare, unprepare
from qat.quant.swap import set_fake_quant_enabled

DECODER_LINEARS = 7 * 2  # q k v o gate up down, 2 layers


def test_default_patterns_take_every_decoder_linear(tiny_llama):
    report = prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    swapped = [n for n, m in tiny_llama.named_modules() if isinstance(m, FakeQuantLinear)]
    assert len(report.layers) == len(swapped) == DECODER_LINEARS
    assert report.skipped == ["lm_head"]
    assert isinstance(tiny_llama.lm_head, nn.Linear) and not isinstance(tiny_llama.lm_head, FakeQuantLinear)
    assert tiny_llama.lm_head.weight is tiny_llama.model.embed_tokens.weight  # tying survives
    assert report.schemes() == {"W4 g64 sym": DECODER_LINEARS}


def test_swap_keeps_the_same_parameters(tiny_llama):
    q_proj = tiny_llama.model.layers[0].self_attn.q_proj
    weight = q_proj.weight
    prepare(tiny_llama, QuantConfig())
    assert tiny_llama.model.layers[0].self_attn.q_proj.weight is weight


def test_overrides_give_per_pattern_schemes(tiny_llama):
    config = QuantConfig(weight=WeightSpec(bits=4, group_size=64),
                         overrides={"*.down_proj": {"bits": 8, "granularity": "channel"},
                                    "*.layers.1.*": {"bits": 3}})
    report = prepare(tiny_llama, config)
    schemes = {l.name: l.scheme for l in report.layers}
    assert schemes["model.layers.0.mlp.down_proj"] == "W8 per-channel sym"
    assert schemes["model.layers.1.mlp.down_proj"] == "W3 per-channel sym"  # later pattern wins
    assert schemes["model.layers.0.self_attn.q_proj"] == "W4 g64 sym"
    assert schemes["model.layers.1.self_attn.q_proj"] == "W3 g64 sym"


def test_pattern_matching_nothing_fails_before_any_swap(tiny_llama):
    with pytest.raises(ValueError, match=r"quant\.include pattern '\*decoder\.blocks\.\*' matches no Linear"):
        prepare(tiny_llama, QuantConfig(include=("*decoder.blocks.*",)))
    with pytest.raises(ValueError, match=r"quant\.overrides pattern '\*\.w2' matches no Linear"):
        prepare(tiny_llama, QuantConfig(overrides={"*.w2": {"bits": 8}}))
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_llama.modules())


def test_group_size_that_does_not_divide_names_the_layer(tiny_llama):
    with pytest.raises(ValueError, match=r"group_size=96 does not divide in_features=128 of layer "
                                         r"'model\.layers\.0\.self_attn\.q_proj'"):
        prepare(tiny_llama, QuantConfig(weight=WeightSpec(group_size=96)))


def test_regex_patterns(tiny_llama):
    report = prepare(tiny_llama, QuantConfig(include=(r"re:model\.layers\.\d+\.mlp\..*",)))
    assert len(report.layers) == 6


@pytest.mark.parametrize("spec", [WeightSpec(bits=4, group_size=64),
                                  WeightSpec(bits=3, granularity="channel", symmetric=False),
                                  WeightSpec(bits=2, group_size=32, symmetric=False, learnable_scale=True)])
def test_unprepare_bake_equals_fake_quant_forward(tiny_llama, spec):
    ids = torch.randint(0, 300, (2, 16))
    prepare(tiny_llama, QuantConfig(weight=spec))
    with torch.no_grad():
        fake = tiny_llama(ids).logits
        unprepare(tiny_llama, bake=True)
        plain = tiny_llama(ids).logits
    assert not any(isinstance(m, FakeQuantLinear) for m in tiny_llama.modules())
    torch.testing.assert_close(plain, fake, rtol=0, atol=0)


def test_unprepare_without_bake_and_disabled_quant_give_the_float_model(tiny_llama):
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        reference = tiny_llama(ids).logits
        prepare(tiny_llama, QuantConfig())
        quantized = tiny_llama(ids).logits
        set_fake_quant_enabled(tiny_llama, False)
        disabled = tiny_llama(ids).logits
        set_fake_quant_enabled(tiny_llama, True)
        unprepare(tiny_llama, bake=False)
        restored = tiny_llama(ids).logits
    assert not torch.equal(quantized, reference)
    torch.testing.assert_close(disabled, reference, rtol=0, atol=0)
    torch.testing.assert_close(restored, reference, rtol=0, atol=0)


def test_moving_average_observer_state_round_trips(tiny_llama):
    config = QuantConfig(weight=WeightSpec(observer="moving_average", averaging_constant=0.5))
    prepare(tiny_llama, config)
    layer = tiny_llama.model.layers[0].self_attn.q_proj
    layer.train()
    layer(torch.randn(1, 128))
    first_max = layer.weight_fake_quant.observer.max_val.clone()
    with torch.no_grad():
        layer.weight.mul_(3.0)
    layer(torch.randn(1, 128))
    observer = layer.weight_fake_quant.observer
    torch.testing.assert_close(observer.max_val, first_max + 0.5 * (3 * first_max - first_max))
    state = layer.state_dict()
    fresh = FakeQuantLinear.from_linear(nn.Linear(128, 128, bias=False), layer.weight_fake_quant.spec)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.weight_fake_quant.observer.max_val, observer.max_val)
