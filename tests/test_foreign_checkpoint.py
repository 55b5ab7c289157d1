"""Checkpoints that the compressed-tensors package writes itself (as llm-compressor does) load in qat
with the weights compressed-tensors means, and what transformers does with them matches the report."""
from __future__ import annotations

import json

import pytest
import torch

from qat.export.load import load_quantized

GROUP = 32


def ct_checkpoint(model, directory, **weights) -> dict[str, torch.Tensor]:
    """Quantize every Linear but lm_head with compressed-tensors' own lifecycle (min/max qparams,
    its fake_quantize), compress with its ModelCompressor and save: its weights, its config."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, apply_quantization_config)
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(type="int", strategy="group", group_size=GROUP, **weights)
    apply_quantization_config(model, QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=args)},
        ignore=["lm_head"]))
    meant = {}
    for name, module in model.named_modules():
        if not hasattr(module, "weight_scale"):
            continue
        groups = module.weight.data.reshape(module.weight.shape[0], -1, GROUP)
        scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
        module.weight_scale.data.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero.round())
        meant[name] = fake_quantize(module.weight.data, module.weight_scale,
                                    getattr(module, "weight_zero_point", None), args)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(directory)
    return meant


def served_weight(layer) -> torch.Tensor:
    with torch.no_grad():
        out = layer(torch.eye(layer.in_features))
    return (out - layer.bias if layer.bias is not None else out).T


@pytest.mark.parametrize("bits,symmetric", [(4, True), (8, True), (4, False), (3, False)])
def test_compressed_tensors_checkpoint_loads_with_its_weights(tiny_llama, tmp_path, bits,
                                                              symmetric):
    from transformers import AutoModelForCausalLM

    from qat.export.serving import transformers_issues
    from qat.format.schema import scheme_from_args
    from qat.quant import WeightSpec
    from qat.quant.swap import LayerReport

    meant = ct_checkpoint(tiny_llama, tmp_path, num_bits=bits, symmetric=symmetric)
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["format"] == "pack-quantized" and written["quantization_status"] == "compressed"

    ours = load_quantized(tmp_path, dtype=torch.float32, backend="reference")
    assert len(meant) == 14
    for name, weight in meant.items():
        torch.testing.assert_close(served_weight(ours.get_submodule(name)), weight, rtol=0,
                                   atol=1e-6)

    # the serving report's transformers verdict is what transformers does with this checkpoint
    spec = WeightSpec.from_scheme(scheme_from_args(written["config_groups"]["group_0"]["weights"],
                                                   "config.json"))
    assert (spec.bits, spec.symmetric, spec.group_size) == (bits, symmetric, GROUP)
    layers = [LayerReport(name, w.shape[1], w.shape[0], spec, None) for name, w in meant.items()]
    servable = not transformers_issues(layers)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    except RuntimeError as err:
        assert not servable, f"transformers failed on a checkpoint the report calls servable: {err}"
        return
    assert servable, "transformers loads asymmetric checkpoints now: update serving.py's rule"
    ids = torch.randint(0, tiny_llama.config.vocab_size, (2, 16),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-4, atol=1e-4)



def test_compressed_tensors_weight_act_order_checkpoint_loads(tiny_llama, tmp_path):
    """actorder='weight' (GPTQ's column order, groups left contiguous) stores no permutation; the
    'group' order that does (weight_g_idx) is gone from compressed-tensors 0.20 and refused by our
    loader (test_export.py)."""
    meant = ct_checkpoint(tiny_llama, tmp_path, num_bits=4, symmetric=True, actorder="weight")
    written = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert written["config_groups"]["group_0"]["weights"]["actorder"] == "weight"
    ours = load_quantized(tmp_path, dtype=torch.float32, backend="reference")
    for name, weight in meant.items():
        torch.testing.assert_close(served_weight(ours.get_submodule(name)), weight, rtol=0,
                                   atol=1e-6)
