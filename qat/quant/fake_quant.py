"""Fake quantizer modules: built from a spec, with an `enabled` switch."""
from __future__ import annotations

import math

import torch
from torch import nn

from qat.models.blocks import Switchable
from qat.format.grid import (DTYPES, compute_qparams, dequantize, group_view, quantize, qrange,
                             round_scale)
from qat.quant.observers import build_observer, minmax
from qat.quant.spec import ActivationSpec, WeightSpec
from qat.quant.ste import (code_values, exact_ste, fake_quantize, pack_codes, round_ste,
                           scale_gradient)


class FakeQuantWeight(Switchable):
    """Fake-quantizes a (out, in) weight on the spec's grid.

    With `learnable_scale` the scales are parameters (LSQ), initialised from the weight's min/max at
    construction; otherwise the observer gives them every call, unless `set_qparams` fixed them
    (post-training quantization chose a grid that re-observing the weight would not reproduce).
    """

    def __init__(self, spec: WeightSpec, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True
        self.learned_grid = False  # learn_grid: scale (and zero point) are trained parameters
        # freeze_codes: integer codes in the grouped shape, int8, or two per byte (uint8) at <= 4 bits
        self.register_buffer("codes", None)
        self.observer = build_observer(spec)
        if spec.learnable_scale:
            if weight is None:
                raise ValueError("learnable_scale needs the weight to initialise its scales")
            scale, zp = self._minmax_qparams(weight)
            self.scale = nn.Parameter(scale)
            self.register_buffer("zero_point", zp)

    def _grouped(self, w: torch.Tensor) -> torch.Tensor:
        return group_view(w, self.spec.granularity, self.spec.group_size)

    @property
    def static(self) -> bool:
        """True when `set_qparams` fixed the grid of an observer-driven quantizer."""
        return not self.spec.learnable_scale and "scale" in self._buffers

    @torch.no_grad()
    def learn_grid(self, w: torch.Tensor, zero_point: bool = True) -> list[nn.Parameter]:
        """Make the grid the forward pass uses now a trainable one, and return its parameters.

        The scale (and, asymmetric with `zero_point`, the zero point) become Parameters. Forward
        rounds them exactly as they are stored (scale to `scale_dtype`, zero point to an integer in
        range) with straight-through gradients, so what trains is what `freeze_grid` keeps and the
        export writes. Block-wise QAT trains weights and grid together; end-to-end training of the
        scales alone pairs this with `freeze_codes`.
        """
        if self.learned_grid:
            return [p for p in (self._parameters.get("scale"), self._parameters.get("zero_point"))
                    if p is not None]
        scale, zp = (t.detach().clone() for t in self.qparams(w))
        self._drop_grid()
        self.learned_grid = True
        self.scale = nn.Parameter(scale)
        if zero_point and not self.spec.symmetric:
            self.zero_point = nn.Parameter(zp)
            return [self.scale, self.zero_point]
        self.register_buffer("zero_point", zp)
        return [self.scale]

    @torch.no_grad()
    def freeze_grid(self) -> None:
        """End `learn_grid`: the learned grid, rounded as forward used it, becomes static."""
        if not self.learned_grid:
            return
        scale, zp = (t.detach().clone() for t in self._learned_qparams())
        self._drop_grid()
        self.learned_grid = False
        if self.spec.learnable_scale:
            self.scale = nn.Parameter(scale)
            self.register_buffer("zero_point", zp)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zp)

    @torch.no_grad()
    def freeze_codes(self, w: torch.Tensor) -> None:
        """Fix the integer codes of `w` on the current grid: from now on the weight is
        (codes - zp) * scale whatever `w` does, so only the grid can still change it."""
        if self.codes is not None:
            return
        scale, zp = self.qparams(w)
        codes = quantize(self._grouped(w.detach()), scale.detach(), zp.detach(), self.spec.bits)
        self.codes = pack_codes(codes, self.code_min) \
            if self.spec.bits <= 4 and codes.shape[-1] % 2 == 0 else codes.to(torch.int8)

    @property
    def code_min(self) -> int:
        return qrange(self.spec.bits)[0]

    def code_values(self) -> torch.Tensor:
        """The frozen codes as float32, in the grouped (rows, groups, elements) shape."""
        return code_values(self.codes, self.code_min)

    def _drop_grid(self) -> None:
        for name in ("scale", "zero_point"):
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)

    def _learned_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        dtype = DTYPES[self.spec.scale_dtype]
        tiny = torch.finfo(dtype).tiny
        scale = exact_ste(self.scale, round_scale(self.scale.detach().clamp(min=tiny),
                                                  self.spec.scale_dtype))
        zp = self.zero_point
        if isinstance(zp, nn.Parameter):
            qmin, qmax = qrange(self.spec.bits)
            zp = exact_ste(zp, zp.detach().round().clamp(qmin, qmax))
        return scale, zp

    @torch.no_grad()
    def set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        """Fix (scale, zero_point), shaped (rows, groups, 1), as this quantizer's grid.

        Learned scales are overwritten in place (the optimizer keeps its reference); otherwise they
        become persistent buffers that `qparams` returns instead of observing the weight, so a grid
        chosen by GPTQ or AWQ's clipping survives later calls and checkpoints.
        """
        scale = round_scale(scale.detach().float(), self.spec.scale_dtype)
        zero_point = zero_point.detach().float()
        if scale.ndim != 3 or scale.shape[-1] != 1 or zero_point.shape != scale.shape:
            raise ValueError(f"set_qparams wants (rows, groups, 1) scale and zero_point, got "
                             f"{tuple(scale.shape)} and {tuple(zero_point.shape)}")
        if self.spec.learnable_scale or self.static or self.learned_grid:
            if self.scale.shape != scale.shape:
                raise ValueError(f"set_qparams: scale shape {tuple(scale.shape)} differs from the "
                                 f"quantizer's {tuple(self.scale.shape)}")
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
            return
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero_point.clone())

    def clear_qparams(self) -> None:
        """Back to observing the weight (no-op for learned scales)."""
        if self.static:
            del self._buffers["scale"], self._buffers["zero_point"]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A fresh quantizer has no static buffers (or codes) yet; take them when the checkpoint has.
        if prefix + "codes" in state_dict and self.codes is None:
            self.codes = torch.empty_like(state_dict[prefix + "codes"])
        if not self.spec.learnable_scale and prefix + "scale" in state_dict and not self.static \
                and not self.learned_grid:
            self.register_buffer("scale", torch.empty_like(state_dict[prefix + "scale"]))
            self.register_buffer("zero_point", torch.empty_like(state_dict[prefix + "zero_point"]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.static:  # a learned grid saved raw loads as the grid its forward used (rounded)
            with torch.no_grad():
                self.scale, self.zero_point = (t.detach().clone()
                                               for t in self._learned_qparams())

    def qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero_point) shaped (rows, groups, 1), exactly as the forward pass uses them."""
        spec = self.spec
        if self.learned_grid:
            return self._learned_qparams()
        if spec.learnable_scale:
            return round_ste(self.scale, DTYPES[spec.scale_dtype]), self.zero_point
        if self.static:
            if self.scale.device != w.device and w.device.type != "meta":
                # loaded from a CPU state dict after .to(device); meta: a codes-held layer's shape
                self.scale, self.zero_point = self.scale.to(w.device), self.zero_point.to(w.device)
            return self.scale, self.zero_point
        lo, hi = self.observer(self._grouped(w))
        return compute_qparams(lo, hi, spec.bits, spec.symmetric, spec.scale_dtype)

    @torch.no_grad()
    def _minmax_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = minmax(self._grouped(w.detach()))
        return compute_qparams(lo, hi, self.spec.bits, self.spec.symmetric, self.spec.scale_dtype)

    @torch.no_grad()
    def reset_scale(self, w: torch.Tensor) -> None:
        """Re-initialise learned scales from `w` in place (the optimizer keeps its reference)."""
        if self.spec.learnable_scale:
            scale, zp = self._minmax_qparams(w)
            self.scale.copy_(scale)
            self.zero_point.copy_(zp)

    def forward_qparams(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(scale, zero point or None when symmetric) for the training forward: learned scales
        carry LSQ's gradient scaling."""
        scale, zp = self.qparams(w)
        if self.spec.learnable_scale and not self.learned_grid:
            grouped = self._grouped(w)
            per_scale = grouped.shape[-1] if self.spec.granularity != "tensor" else grouped.numel()
            scale = scale_gradient(scale, 1.0 / math.sqrt(per_scale * qrange(self.spec.bits)[1]))
        return scale, (None if self.spec.symmetric else zp)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale, zp = self.forward_qparams(w)
        if self.codes is not None:  # frozen codes: only the grid carries a gradient
            q = self.code_values() if zp is None else self.code_values() - zp
            return (q * scale).reshape(w.shape).to(w.dtype)
        return fake_quantize(self._grouped(w), scale, zp, self.spec.bits).reshape(w.shape)

    @torch.no_grad()
    def quantized(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Integer codes (int32, shape of w) and (scale, zero_point) as (rows, groups), for export."""
        scale, zp = self.qparams(w)
        scale, zp = scale.detach(), zp.detach()
        q = self.code_values() if self.codes is not None \
            else quantize(self._grouped(w), scale, zp, self.spec.bits)
        return q.reshape(w.shape).to(torch.int32), scale.squeeze(-1), zp.squeeze(-1)

    @torch.no_grad()
    def dequantized(self, w: torch.Tensor) -> torch.Tensor:
        """The weight exactly as the enabled forward pass sees it, with no autograd."""
        scale, zp = self.qparams(w)
        scale, zp = scale.detach(), zp.detach()
        q = self.code_values() if self.codes is not None \
            else quantize(self._grouped(w), scale, zp, self.spec.bits)
        return dequantize(q, scale, zp).reshape(w.shape).to(w.dtype)

    def extra_repr(self) -> str:
        extra = (", learned grid" if self.learned_grid else "") + \
            (", frozen codes" if self.codes is not None else "")
        return f"{self.spec.describe()}, enabled={self.enabled}{extra}"


class FakeQuantActivation(Switchable):
    """Dynamic activation fake quantization: scales from each input's own range, per token."""

    def __init__(self, spec: ActivationSpec) -> None:
        super().__init__()
        self.spec = spec
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        grouped = x.reshape(-1, 1, x.shape[-1]) if self.spec.granularity == "token" \
            else x.reshape(1, 1, -1)
        lo, hi = minmax(grouped.detach())
        scale, zp = compute_qparams(lo, hi, self.spec.bits, self.spec.symmetric, "float32")
        return fake_quantize(grouped, scale, zp, self.spec.bits).reshape(x.shape)

    def extra_repr(self) -> str:
        return f"{self.spec.describe()}, enabled={self.enabled}"
