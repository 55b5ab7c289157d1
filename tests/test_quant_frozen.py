"""Scales-only training (optim.trainable=scales): backward keeps the int8 codes and the
activations, never a float copy of a weight, and computes the gradients autograd gives the
composed expression, bit for bit."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qat.quant import QuantConfig, WeightSpec, fake_quant_modules, prepare, set_trainable
from qat.quant.modules import FakeQuantLinear

SPECS = {"w4g32": WeightSpec(bits=4, group_size=32),
         "w3g32_asym": WeightSpec(bits=3, group_size=32, symmetric=False),
         "w8_channel": WeightSpec(bits=8, granularity="channel", group_size=None)}


def frozen_layer(spec: WeightSpec, bias: bool = False, zero_point: bool = False) -> FakeQuantLinear:
    torch.manual_seed(0)
    layer = FakeQuantLinear.from_linear(nn.Linear(64, 48, bias=bias), spec)
    layer.weight.requires_grad_(False)
    fq = layer.weight_fake_quant
    fq.freeze_codes(layer.weight)
    fq.learn_grid(layer.weight, zero_point=zero_point)
    return layer


def composed(layer: FakeQuantLinear, x: torch.Tensor) -> torch.Tensor:
    """What the frozen path replaced: F.linear on the fake-quantized weight, through autograd."""
    return F.linear(x, layer.weight_fake_quant(layer.weight), layer.bias)


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("zero_point", [False, True])
def test_values_and_gradients_are_autograds_bit_for_bit(name, zero_point):
    layer = frozen_layer(SPECS[name], bias=True, zero_point=zero_point)
    layer.bias.requires_grad_(True)
    grid = [p for p in layer.parameters() if p.requires_grad]
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    grad_y = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(2))
    results = []
    for forward in (layer, lambda t: composed(layer, t)):
        y = forward(x)
        grads = torch.autograd.grad(y, [x, *grid], grad_y)
        results.append((y, grads))
    (y1, g1), (y2, g2) = results
    assert torch.equal(y1, y2)
    assert len(g1) == len(g2) >= 3
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)


def saved_float_sizes(run) -> list[int]:
    """numel of every floating-point tensor autograd saves while `run()` builds its graph."""
    sizes = []

    def pack(t):
        if t.is_floating_point():
            sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sizes


def test_a_layer_saves_no_float_weight():
    layer = frozen_layer(SPECS["w4g32"])
    x = torch.randn(2, 64, requires_grad=True)
    weight = layer.weight.numel()
    assert all(n < weight for n in saved_float_sizes(lambda: layer(x)))
    # the check can fail: the composed expression keeps two float copies of the weight
    assert sum(n >= weight for n in saved_float_sizes(lambda: composed(layer, x))) == 2


def test_a_scales_only_model_saves_codes_and_activations_alone(tiny_llama):
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    set_trainable(tiny_llama, "scales")
    weights = {m.out_features * m.in_features for m in fake_quant_modules(tiny_llama)}
    assert all(m.weight is None for m in fake_quant_modules(tiny_llama))  # codes held alone
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    assert all(n % ids.numel() for n in weights)  # no activation can have a weight's size
    sizes = saved_float_sizes(lambda: tiny_llama(input_ids=ids).logits.float().logsumexp(-1).sum())
    assert sizes and not [n for n in sizes if n in weights]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradient_checkpointing_recomputes_fake_quantized_blocks(tiny_llama, checkpointing):
    """model.gradient_checkpointing: each block runs again in backward, through the frozen-codes
    path, and the scales get the same gradients."""
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    set_trainable(tiny_llama, "scales")
    if checkpointing:
        from qat.train.steps import checkpoint_activations

        checkpoint_activations(tiny_llama)
    tiny_llama.train()
    calls = []
    # a pre-hook on the block's first projection: the recompute stops once it has what backward
    # needs, so a hook after a block's last module would not see it
    tiny_llama.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda *a: calls.append(1))
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    tiny_llama(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert len(calls) == (2 if checkpointing else 1)
    grads = [p.grad for p in tiny_llama.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def _scales_only(model, spec=WeightSpec(bits=4, group_size=64, symmetric=False)):
    prepare(model, QuantConfig(weight=spec))
    for m in fake_quant_modules(model):  # a grid the weight does not sit on exactly
        m.weight_fake_quant.freeze_codes(m.weight)
    return model


def test_holding_codes_drops_the_float_weight_and_changes_no_output(tiny_llama):
    from qat.eval.sqnr import weight_sqnr

    _scales_only(tiny_llama)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = tiny_llama(input_ids=ids).logits
    sqnr_before = weight_sqnr(tiny_llama)
    float_bytes = sum(m.weight.numel() * 4 for m in fake_quant_modules(tiny_llama))
    set_trainable(tiny_llama, "scales")
    state = tiny_llama.state_dict()
    assert not [k for k in state if k.endswith("proj.weight")]
    held = sum(t.numel() * t.element_size() for k, t in state.items() if "proj." in k)
    assert held < float_bytes / 5  # 4-bit codes two per byte, a grid and two sums per group
    with torch.no_grad():
        assert torch.equal(tiny_llama(input_ids=ids).logits, before)
    sqnr_held = weight_sqnr(tiny_llama)  # from the kept sums, with the grid learned now
    for name, db in sqnr_before.items():
        assert sqnr_held[name] == pytest.approx(db, rel=1e-5), name
    # the sums follow the grid: a changed scale changes the SQNR as the float weight would say
    layer = next(iter(fake_quant_modules(tiny_llama)))
    with torch.no_grad():
        layer.weight_fake_quant.scale.mul_(1.1)
    name = next(n for n, m in tiny_llama.named_modules() if m is layer)
    assert weight_sqnr(tiny_llama)[name] < sqnr_before[name] - 0.1


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_codes_held_state_loads_into_a_fresh_float_model(tiny_llama, symmetric):
    """What another rank does with rank 0's calibrated model (qat.train.ranks): the float
    layers take the codes, the kept sums (none of weights for a symmetric grid) and the grid."""
    import copy

    from qat.eval.sqnr import weight_sqnr

    fresh = copy.deepcopy(tiny_llama)
    spec = WeightSpec(bits=4, group_size=64, symmetric=symmetric)
    _scales_only(tiny_llama, spec)
    set_trainable(tiny_llama, "scales")
    with torch.no_grad():
        for m in fake_quant_modules(tiny_llama):
            m.weight_fake_quant.scale.mul_(0.9)  # trained scales
    prepare(fresh, QuantConfig(weight=spec))
    fresh.load_state_dict(tiny_llama.state_dict(), strict=True)
    assert all(m.holds_codes for m in fake_quant_modules(fresh))
    assert weight_sqnr(fresh) == weight_sqnr(tiny_llama)
    ids = torch.randint(0, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=ids).logits, tiny_llama(input_ids=ids).logits)
    with pytest.raises(RuntimeError, match="codes"):
        from qat.quant import set_fake_quant_enabled

        set_fake_quant_enabled(fresh, False)
        fresh(input_ids=ids)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_codes_of_up_to_4_bits_pack_two_per_byte_exactly(bits):
    from qat.quant.ste import code_values, pack_codes

    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    codes = torch.randint(low, high + 1, (3, 5, 64), generator=torch.Generator().manual_seed(bits))
    packed = pack_codes(codes, low)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 32)
    assert torch.equal(code_values(packed, low), codes.float())
    layer = frozen_layer(WeightSpec(bits=bits, group_size=32))
    assert layer.weight_fake_quant.codes.dtype == torch.uint8
    assert layer.weight_fake_quant.codes.numel() * 2 == layer.weight.numel()
    assert frozen_layer(SPECS["w8_channel"]).weight_fake_quant.codes.dtype == torch.int8
