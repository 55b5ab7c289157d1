"""Outlier features and mixed precision: which layers to protect, and how many bits each gets."""
import itertools
import json

import pytest
import torch

from qat.ptq import (assign_bits, bits_per_weight, detect_outliers, layer_sensitivity,
                     linear_numel, protected_layers, protection_overrides, to_overrides)
from qat.quant import QuantConfig, WeightSpec, prepare
from qat.quant.swap import plan

PLANTED = [5, 77]


def _ids(n=8, t=32, seed=0):
    return torch.randint(0, 300, (n, t), generator=torch.Generator().manual_seed(seed))


def test_detects_planted_outlier_features(tiny_llama):
    with torch.no_grad():  # RMSNorm output is ~N(0, 1); x20 makes |x| > 6 on most tokens
        tiny_llama.model.layers[1].post_attention_layernorm.weight[PLANTED] = 20.0
    report = detect_outliers(tiny_llama, _ids())
    layers = [f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up")]
    assert report == {name: PLANTED for name in layers}
    assert json.loads(json.dumps(report)) == report
    assert protected_layers(report) == layers
    config = QuantConfig(weight=WeightSpec(bits=4), overrides=protection_overrides(report))
    bits = {layer.name: layer.spec.bits for layer in plan(tiny_llama, config).layers}
    assert {n for n, b in bits.items() if b == 8} == set(layers)


def test_rare_large_values_are_not_outlier_features(tiny_llama):
    with torch.no_grad():
        tiny_llama.model.layers[1].post_attention_layernorm.weight[PLANTED] = 20.0
    assert detect_outliers(tiny_llama, _ids(), threshold=100.0) == {}
    with pytest.raises(ValueError, match="min_fraction"):
        detect_outliers(tiny_llama, _ids(), min_fraction=0.0)


def _objective(assignment, sens):
    return sum(sens[n][b] for n, b in assignment.items())


def _mean_bits(assignment, numel, **overhead):
    total = sum(numel.values())
    return sum(numel[n] * bits_per_weight(b, **overhead) for n, b in assignment.items()) / total


def test_assign_bits_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(5)]
    choices = (2, 4, 8)
    numel = {n: 1000 for n in names}
    sens = {}
    for n in names:  # decreasing in bits, with random per-layer sensitivity
        base = torch.rand(1, generator=g).item() * 10
        sens[n] = {2: base, 4: base / 4, 8: base / 64}
    for budget in (2.0, 3.2, 4.0, 5.6, 8.0):
        got = assign_bits(sens, numel, budget, choices)
        assert _mean_bits(got, numel) <= budget + 1e-9
        best = min((dict(zip(names, bits)) for bits in itertools.product(choices, repeat=5)
                    if _mean_bits(dict(zip(names, bits)), numel) <= budget + 1e-9),
                   key=lambda a: _objective(a, sens))
        assert _objective(got, sens) == pytest.approx(_objective(best, sens))


def test_assign_bits_with_scale_overhead_and_unequal_layers():
    numel = {"big": 64 * 4096, "small": 64 * 512, "mid": 64 * 1024}
    sens = {"big": {2: 1.0, 3: 0.5, 4: 0.2}, "small": {2: 9.0, 3: 3.0, 4: 1.0},
            "mid": {2: 2.0, 3: 1.0, 4: 0.3}}
    got = assign_bits(sens, numel, 3.0, group_size=64, symmetric=False)
    assert _mean_bits(got, numel, group_size=64, symmetric=False) <= 3.0
    assert got["small"] >= got["mid"] >= got["big"]
    with pytest.raises(ValueError, match="budget_bits"):
        assign_bits(sens, numel, 2.1, group_size=64)


def test_sensitive_layer_gets_more_bits(tiny_llama):
    with torch.no_grad():
        for p in tiny_llama.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
        tiny_llama.model.layers[0].mlp.down_proj.weight.mul_(8.0)  # its error now dominates
    prepare(tiny_llama, QuantConfig(weight=WeightSpec(bits=4, group_size=32)))
    names = [f"model.layers.{i}.mlp.down_proj" for i in (0, 1)] + \
        ["model.layers.1.self_attn.o_proj", "model.layers.1.mlp.up_proj"]
    layers = {n: WeightSpec(bits=4, group_size=32) for n in names}
    sens = layer_sensitivity(tiny_llama, _ids(4), (2, 3, 4), layers=layers)
    for n in names:
        assert sens[n][2] > sens[n][3] > sens[n][4] > 0
    numel = linear_numel(tiny_llama, names)
    assignment = assign_bits(sens, numel, 3.0)
    assert _mean_bits(assignment, numel) <= 3.0
    planted = assignment["model.layers.0.mlp.down_proj"]
    assert planted == max(assignment.values()) and planted > min(assignment.values())
    overrides = to_overrides(assignment)
    assert overrides["model.layers.0.mlp.down_proj"] == {"bits": planted}
    config = QuantConfig(weight=WeightSpec(bits=4, group_size=32), overrides=overrides)
    assert config.spec_for("model.layers.0.mlp.down_proj",
                           lambda n, p: n == p).bits == planted
