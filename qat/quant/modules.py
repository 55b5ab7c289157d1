"""The swapped layer: a Linear whose weight (and optionally input) pass through fake quantizers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.fake_quant import FakeQuantActivation, FakeQuantWeight
from qat.quant.spec import ActivationSpec, WeightSpec
from qat.quant.ste import fake_quant_linear, frozen_codes_linear
from qat.models.structure import TRANSPOSED, source_class, stored_transposed


class FakeQuantLinear(nn.Linear):
    """nn.Linear with fake-quantized weight; shares the original weight and bias Parameters."""

    def __init__(self, in_features: int, out_features: int, bias: bool, weight_spec: WeightSpec,
                 activation_spec: ActivationSpec | None = None, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.weight_fake_quant = FakeQuantWeight(weight_spec, self.weight)
        self.input_fake_quant = FakeQuantActivation(activation_spec) if activation_spec else None
        self.source_class = "Linear"  # the swapped layer's own class (from_linear sets it)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_spec: WeightSpec,
                    activation_spec: ActivationSpec | None = None) -> "FakeQuantLinear":
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, linear.bias is not None,
                      weight_spec, activation_spec, dtype=linear.weight.dtype)
        new.weight = linear.weight  # same Parameter: optimizer state and tying survive the swap
        new.bias = linear.bias
        new.weight_fake_quant = FakeQuantWeight(weight_spec, linear.weight)  # real scales, not meta
        if stored_transposed(linear):
            setattr(new, TRANSPOSED, True)
        new.source_class = source_class(linear)  # e.g. Conv1D, FalconLinear: what export names
        return new

    def to_linear(self, bake: bool = True) -> nn.Linear:
        """A plain Linear; with `bake` its weight is the fake-quantized weight (what export stores)."""
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                               dtype=self.weight.dtype)
        weight = self.weight_fake_quant.dequantized(self.weight) if bake else self.weight.detach()
        linear.weight = nn.Parameter(weight.clone(), requires_grad=self.weight.requires_grad)
        linear.bias = self.bias
        if stored_transposed(self):
            setattr(linear, TRANSPOSED, True)
            linear.source_class = self.source_class
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        fq = self.weight_fake_quant
        if not fq.enabled:
            return F.linear(x, self.weight, self.bias)
        if fq.codes is not None and not _autocast(x):  # frozen codes: only the grid trains
            scale, zero_point = fq.forward_qparams(self.weight)
            return frozen_codes_linear(x, fq.codes, scale, zero_point, self.bias,
                                       self.weight.shape, self.weight.dtype)
        if _autocast(x) or fq.codes is not None:  # autocast picks the matmul dtype: let F.linear
            # see the fake-quantized weight
            return F.linear(x, fq(self.weight), self.bias)
        scale, zero_point = fq.forward_qparams(self.weight)
        return fake_quant_linear(x, self.weight, scale, zero_point, self.bias, fq.spec.bits)


def _autocast(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)
