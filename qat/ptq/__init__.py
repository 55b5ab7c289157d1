"""Post-training quantization: calibrate a prepared model's weights onto the fake quantizer's grid.

    prepare(model, quant_config)                       # FakeQuantLinear layers, specs per layer
    report = quantize_model(model, "gptq", ids)        # or PTQSpec(...), weights + static qparams
    export_model(model, tokenizer, out_dir)            # unchanged exporter
"""
from qat.ptq.apply import METHODS, PTQReport, quantize_model, quantized_linears
from qat.ptq.calibrate import (InputStats, collect_input_stats, kl_to_float,
                               run_blocks)
from qat.ptq.gptq import GPTQResult, gptq_quantize
from qat.ptq.outliers import detect_outliers, protected_layers, protection_overrides
from qat.ptq.rtn import fake_quant, rtn_qparams
from qat.ptq.sensitivity import (assign_bits, bits_per_weight, layer_sensitivity, linear_numel,
                                 to_overrides)
from qat.ptq.spec import PTQSpec

__all__ = [
    "GPTQResult", "InputStats", "METHODS", "PTQReport", "PTQSpec", "assign_bits",
    "bits_per_weight", "collect_input_stats", "decoder_blocks", "detect_outliers", "fake_quant",
    "gptq_quantize", "kl_to_float", "layer_sensitivity", "linear_numel", "protected_layers",
    "protection_overrides", "quantize_model", "quantized_linears", "rtn_qparams", "run_blocks",
    "to_overrides",
]
