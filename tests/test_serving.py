"""The serving report: which targets can run an export, from the scheme and the layer shapes."""
from __future__ import annotations

import pytest

from qat.export.serving import (TARGETS, check_target, marlin_issues, serving_report,
                                transformers_issues, vllm_cpu_issues)
from qat.quant import WeightSpec
from qat.quant.swap import LayerReport


def layer(name="q", inp=1024, out=1024, kind="Linear", **spec) -> LayerReport:
    return LayerReport(name, inp, out, WeightSpec(**spec), None, kind)


def reasons(issues: dict[str, list[str]]) -> str:
    return " | ".join(issues)


def test_w4_g128_symmetric_aligned_layers_serve_everywhere():
    report = serving_report([layer(group_size=128), layer("k", 2048, 512, group_size=128)])
    assert set(report) == set(TARGETS)
    assert all(entry["servable"] and not entry["reasons"] for entry in report.values())
    assert "AVX-512" in report["vllm-cpu"]["requires"]


def test_576_wide_layers_fail_marlin_but_not_the_cpu_kernel():
    layers = [layer(inp=576, out=576), layer("down", 1536, 576)]
    assert marlin_issues(layers) == {"in_features 576 not divisible by 128": ["q"]}
    assert vllm_cpu_issues(layers) == {}


def test_sub_byte_widths_are_refused_by_vllm_with_the_packing_reason():
    for bits in (2, 3):
        gpu, cpu = marlin_issues([layer(bits=bits)]), vllm_cpu_issues([layer(bits=bits)])
        assert f"{bits}-bit weights: vLLM serves 4- and 8-bit" in reasons(gpu)
        assert ("padding" in reasons(gpu)) == (bits == 3)  # 2 bits divide 32: same layout
        assert f"{bits}-bit weights: vLLM's CPU kernel serves 4-bit" in reasons(cpu)
        assert transformers_issues([layer(bits=bits)]) == {}


def test_zero_points_and_eight_bits():
    assert marlin_issues([layer(symmetric=False)]) == {}  # uint4 with zero points: Marlin has it
    assert "zero points at 4 bits only" in reasons(marlin_issues([layer(bits=8, symmetric=False)]))
    assert marlin_issues([layer(bits=8, granularity="channel", group_size=None)]) == {}
    assert "symmetric 4-bit only" in reasons(vllm_cpu_issues([layer(symmetric=False)]))
    assert "serves 4-bit weight-only layers only" in reasons(vllm_cpu_issues([layer(bits=8)]))


def test_scale_granularity_and_shapes():
    tensor = layer(granularity="tensor", group_size=None)
    assert "Marlin: per-channel or group" in reasons(marlin_issues([tensor]))
    assert "per-tensor scales" in reasons(vllm_cpu_issues([tensor]))
    assert "group size 33 is odd" in reasons(vllm_cpu_issues([layer(inp=33 * 32, group_size=33)]))
    issues = vllm_cpu_issues([layer(inp=1000, out=1000)])
    assert set(issues) == {"in_features 1000 not divisible by 32 (vLLM's CPU kernel)",
                           "out_features 1000 not divisible by 32 (vLLM's CPU kernel)"}


def test_layer_kinds_only_transformers_cares_about():
    issues = transformers_issues([layer("c_attn", kind="Conv1D"), layer("dense", kind="FalconLinear"),
                                  layer("plain")])
    assert [names for names in issues.values()] == [["c_attn"], ["dense"]]
    assert all("qat.load_quantized" in reason for reason in issues)
    assert serving_report([layer(kind="Conv1D")])["qat"]["servable"]


def test_unknown_target_names_the_allowed_values():
    check_target(None)
    for target in TARGETS:
        check_target(target)
    with pytest.raises(ValueError, match="export.target='marlin' is not a serving target; allowed: "
                                         "null, qat, transformers, vllm-gpu, vllm-cpu"):
        check_target("marlin")


def test_moe_experts_have_vllms_fused_moe_rules():
    expert = "model.layers.0.mlp.experts.3.w1"
    ok = serving_report([layer(expert, 256, 512, bits=4, group_size=64)])
    assert ok["vllm-gpu"]["servable"] and ok["vllm-gpu"]["limits"]
    asym = serving_report([layer(expert, 256, 512, bits=4, group_size=64,
                                 symmetric=False)])["vllm-gpu"]
    assert not asym["servable"] and "symmetric" in reasons(asym["reasons"])
    three = serving_report([layer(expert, 256, 512, bits=3, group_size=64)])
    assert not three["vllm-gpu"]["servable"]
    assert not three["vllm-cpu"]["servable"]  # not run on vLLM's CPU build: said, not claimed
    assert any("bf16" in limit for limit in ok["transformers"]["limits"])
    dense = serving_report([layer("model.layers.0.mlp.up_proj", 256, 512, bits=4,
                                  group_size=64)])
    assert all("limits" not in entry for entry in dense.values())
