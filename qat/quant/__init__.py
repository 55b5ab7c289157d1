"""Quantization core: specs, observers, fake quantizers and the Linear swap (the integer grid they
compute on is qat.format.grid)."""
from qat.quant.fake_quant import FakeQuantActivation, FakeQuantWeight
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import ActivationSpec, QuantConfig, WeightSpec
from qat.quant.swap import (PrepareReport, fake_quant_modules, keeps_codes_only, plan, prepare,
                            set_fake_quant_enabled, set_trainable, unprepare)

__all__ = [
    "ActivationSpec", "FakeQuantActivation", "FakeQuantLinear", "FakeQuantWeight", "PrepareReport",
    "QuantConfig", "WeightSpec", "fake_quant_modules", "keeps_codes_only", "plan", "prepare",
    "set_fake_quant_enabled", "set_trainable", "unprepare",
]
