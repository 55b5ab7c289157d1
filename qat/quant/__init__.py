"""Quantization core: specs, the integer grid, fake quantizers and the Linear swap."""
from qat.quant.fake_quant import FakeQuantActivation, FakeQuantWeight
from qat.quant.grid import compute_qparams, dequantize, qrange, quantize
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import ActivationSpec, QuantConfig, WeightSpec
from qat.quant.swap import (PrepareReport, convert, fake_quant_modules, plan, prepare,
                            set_fake_quant_enabled)

__all__ = [
    "ActivationSpec", "FakeQuantActivation", "FakeQuantLinear", "FakeQuantWeight", "PrepareReport",
    "QuantConfig", "WeightSpec", "compute_qparams", "convert", "dequantize", "fake_quant_modules",
    "plan", "prepare", "qrange", "quantize", "set_fake_quant_enabled",
]
