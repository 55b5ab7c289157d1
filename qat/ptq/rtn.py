"""Round-to-nearest: the min-max grid our fake quantizer starts from, as pure functions."""
from __future__ import annotations

import torch

from qat.format.grid import compute_qparams, dequantize, group_view, quantize
from qat.quant.observers import minmax
from qat.quant.spec import WeightSpec


def grouped(w: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """(rows, groups, elements) view of a (out, in) weight, as the fake quantizer sees it."""
    return group_view(w.float(), spec.granularity, spec.group_size)


def rtn_qparams(w: torch.Tensor, spec: WeightSpec, ratio: float | torch.Tensor = 1.0
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) shaped (rows, groups, 1) from each group's min/max times `ratio`.

    ratio < 1 clips the range (AWQ's clipping search); 1 is exactly the fake quantizer's grid.
    """
    lo, hi = minmax(grouped(w, spec))
    return compute_qparams(lo * ratio, hi * ratio, spec.bits, spec.symmetric, spec.scale_dtype)


def fake_quant(w: torch.Tensor, spec: WeightSpec, scale: torch.Tensor | None = None,
               zero_point: torch.Tensor | None = None) -> torch.Tensor:
    """w on the grid (float32, shape of w); min-max qparams unless given."""
    if scale is None:
        scale, zero_point = rtn_qparams(w, spec)
    q = quantize(grouped(w, spec), scale, zero_point, spec.bits)
    return dequantize(q, scale, zero_point).reshape(w.shape)
