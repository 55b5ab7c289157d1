"""The swapped layer: a Linear whose weight (and optionally input) pass through fake quantizers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant.fake_quant import FakeQuantActivation, FakeQuantWeight
from qat.quant.spec import ActivationSpec, WeightSpec
from qat.quant.ste import fake_quant_grouped_linear, fake_quant_linear, frozen_codes_linear
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

    @torch.no_grad()
    def hold_codes(self) -> None:
        """Keep the frozen integer codes and drop the float weight: with the codes frozen
        (optim.trainable=scales) it can no longer change the output, and it cost 4 (or 2) bytes
        per parameter beside the codes' one. Three sums per group (`held_sqnr_terms`) keep the
        weight's SQNR measurable as the scales train."""
        if self.weight is None:
            return
        fq = self.weight_fake_quant
        if fq.codes is None:
            raise RuntimeError("hold_codes: freeze the codes first (weight_fake_quant.freeze_codes)")
        if not (fq.static or fq.learned_grid or fq.spec.learnable_scale):
            fq.set_qparams(*fq.qparams(self.weight))  # the observer's grid, kept: no weight after
        # (rows, groups), float32 (a quarter of the codes' bytes at group 64): sum of w * code,
        # and for an asymmetric grid sum of w; in float64, a few rows at a time
        w, q = fq._grouped(self.weight.detach()), fq.code_values()
        power = torch.zeros((), dtype=torch.float64, device=w.device)
        dot = torch.empty(w.shape[:2], dtype=torch.float32, device=w.device)
        total = torch.empty_like(dot)
        step = max(1, (1 << 20) // max(w[0].numel(), 1))
        for start in range(0, w.shape[0], step):
            rows = w[start:start + step].double()
            power += rows.pow(2).sum()
            dot[start:start + step] = (rows * q[start:start + step].double()).sum(-1)
            total[start:start + step] = rows.sum(-1)
        self.register_buffer("float_power", power)
        self.register_buffer("float_dot", dot)
        self.register_buffer("float_sum", None if fq.spec.symmetric else total)
        self.float_dtype = self.weight.dtype
        self.weight = None

    @torch.no_grad()
    def thaw(self, weight: torch.Tensor) -> None:
        """Undo `hold_codes` with the float weight it dropped (read back from the model's files):
        the block stage trains weights again, on the grid the layer kept."""
        self.weight = nn.Parameter(weight.to(self.float_dtype if self.weight is None
                                             else self.weight.dtype))
        self.weight_fake_quant.codes = None
        for name in ("float_power", "float_dot", "float_sum"):
            self._buffers.pop(name, None)

    @property
    def holds_codes(self) -> bool:
        return self.weight is None

    def weight_like(self) -> torch.Tensor:
        """The float weight, or (codes held) a meta tensor of its shape and dtype: what the
        quantizer's methods read the shape from."""
        if self.weight is not None:
            return self.weight
        return torch.empty(self.out_features, self.in_features, dtype=self.float_dtype,
                           device="meta")

    @torch.no_grad()
    def held_sqnr_terms(self) -> tuple[float, float]:
        """(|w|^2, |w - w_hat|^2) of a codes-held layer, from the sums taken when the weight was
        dropped and the grid now: |w|^2 - 2 sum_g s_g (sum w q - zp_g sum w) + |w_hat|^2."""
        fq = self.weight_fake_quant
        scale, zp = (t.detach().double().squeeze(-1) for t in fq.qparams(self.weight_like()))
        w_hat = fq.dequantized(self.weight_like()).double()
        dot = self.float_dot.double()
        cross = (scale * (dot if self.float_sum is None
                          else dot - zp * self.float_sum.double())).sum()
        noise = self.float_power - 2 * cross + w_hat.pow(2).sum()
        return float(self.float_power), max(float(noise), 0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a codes-held layer's state (codes, no weight) loads into a fresh float layer: drop it
        if self.weight is not None and prefix + "weight" not in state_dict \
                and prefix + "weight_fake_quant.codes" in state_dict:
            self.float_dtype = self.weight.dtype
            self.weight = None
            for name in ("float_power", "float_dot", "float_sum"):  # float_sum: None, symmetric
                self.register_buffer(name, torch.empty_like(state_dict[prefix + name])
                                     if prefix + name in state_dict else None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def to_linear(self, bake: bool = True) -> nn.Linear:
        """A plain Linear; with `bake` its weight is the fake-quantized weight (what export stores)."""
        if self.weight is None and not bake:
            raise RuntimeError("to_linear(bake=False): this layer holds codes, not its float weight")
        with torch.device("meta"):
            linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                               dtype=self.weight_like().dtype)
        weight = self.weight_fake_quant.dequantized(self.weight_like()) if bake \
            else self.weight.detach()
        linear.weight = nn.Parameter(weight.clone(), requires_grad=self.weight is not None
                                     and self.weight.requires_grad)
        linear.bias = self.bias
        if stored_transposed(self):
            setattr(linear, TRANSPOSED, True)
            linear.source_class = self.source_class
        return linear

    @staticmethod
    def can_group(layers: list["FakeQuantLinear"]) -> bool:
        """Whether `grouped_linear` runs these layers (one projection of every expert) as one:
        float weights fake-quantized on one kind of grid, no input quantizer, no frozen codes."""
        first = layers[0].weight_fake_quant.spec
        return all(layer.weight is not None and layer.input_fake_quant is None
                   and layer.weight_fake_quant.enabled and layer.weight_fake_quant.codes is None
                   and layer.weight_fake_quant.spec == first for layer in layers)

    @staticmethod
    def grouped_linear(layers: list["FakeQuantLinear"], x: torch.Tensor, counts: list[int]
                       ) -> torch.Tensor:
        """Each layer's fake-quantized forward (no bias) on its rows of `x`, one call for all:
        the same grid, values and straight-through gradients as calling them one by one."""
        fqs = [layer.weight_fake_quant for layer in layers]
        grids = [fq.forward_qparams(layer.weight) for fq, layer in zip(fqs, layers)]
        weights = [fq._grouped(layer.weight) for fq, layer in zip(fqs, layers)]
        zero_points = None if grids[0][1] is None else [zp for _, zp in grids]
        return fake_quant_grouped_linear(x, weights, [scale for scale, _ in grids], zero_points,
                                         layers[0].weight.shape, fqs[0].spec.bits, counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_fake_quant is not None:
            x = self.input_fake_quant(x)
        fq = self.weight_fake_quant
        if not fq.enabled:
            if self.weight is None:
                raise RuntimeError("fake quantization is off, but this layer holds its integer "
                                   "codes, not its float weight (optim.trainable=scales)")
            return F.linear(x, self.weight, self.bias)
        w = self.weight_like()
        if fq.codes is not None and not _autocast(x):  # frozen codes: only the grid trains
            scale, zero_point = fq.forward_qparams(w)
            return frozen_codes_linear(x, fq.codes, scale, zero_point, self.bias, w.shape, w.dtype,
                                       fq.code_min)
        if _autocast(x) or fq.codes is not None:  # autocast picks the matmul dtype: let F.linear
            # see the fake-quantized weight
            return F.linear(x, fq(w), self.bias)
        scale, zero_point = fq.forward_qparams(w)
        return fake_quant_linear(x, w, scale, zero_point, self.bias, fq.spec.bits)


def _autocast(x: torch.Tensor) -> bool:
    return torch.is_autocast_enabled(x.device.type)
