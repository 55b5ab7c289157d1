"""GPTQ (Frantar et al. 2022): quantize columns in order, pushing each column's error onto the
columns not yet quantized through the inverse Hessian of the layer-output error.

Numerics follow the reference implementation: H = 2 X^T X / n, `damp` * mean(diag H) added to the
diagonal, dead inputs (diag H = 0) zeroed, the upper Cholesky factor of H^-1, and lazy batch
updates over blocks of columns. Grids are our grid (qat.format.grid), so the export is unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qat.format.grid import compute_qparams, dequantize, quantize
from qat.ptq.rtn import rtn_qparams
from qat.quant.spec import WeightSpec

DAMP_RETRIES = 4  # each retry multiplies damp by 10 when H + damp*I is not positive definite


@dataclass
class GPTQResult:
    weight: torch.Tensor  # (out, in) float32, on the grid, original column order
    scale: torch.Tensor  # (rows, groups, 1)
    zero_point: torch.Tensor  # (rows, groups, 1)
    error: float  # GPTQ's own estimate of the added layer-output squared error
    damp: float  # the dampening that made H positive definite


def inverse_cholesky(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1, i.e. H^-1 = U^T U.

    Raises the dampening tenfold (up to DAMP_RETRIES times) rather than fail on a Hessian that
    float32 round-off left indefinite; returns the dampening used.
    """
    idx = torch.arange(hessian.shape[0], device=hessian.device)
    mean_diag = torch.mean(torch.diag(hessian))
    for attempt in range(DAMP_RETRIES + 1):
        h = hessian.clone()
        h[idx, idx] += damp * mean_diag
        chol, info = torch.linalg.cholesky_ex(h)
        if info == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True), damp
        damp *= 10
    raise ValueError(f"gptq: Hessian not positive definite even with damp={damp / 10:g}; use more "
                     "calibration samples or raise ptq.damp")


def _column_groups(spec: WeightSpec, cols: int, perm: torch.Tensor | None,
                   device: torch.device) -> torch.Tensor:
    """Index of the scale group of each (possibly permuted) column in the original layout."""
    original = perm if perm is not None else torch.arange(cols, device=device)
    if spec.granularity != "group":
        return torch.zeros(cols, dtype=torch.long, device=device)
    return original // spec.group_size


def _block_size(spec: WeightSpec, block_size: int) -> int:
    """Blocks made of whole groups, so a group's scale is taken from fully updated columns.
    Lazy batching is exact, so the block size changes speed only, not the result."""
    if spec.granularity != "group":
        return block_size
    gs = spec.group_size
    return max(gs, block_size // gs * gs)


@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: WeightSpec, *,
                  damp: float = 0.01, block_size: int = 128, act_order: bool = False
                  ) -> GPTQResult:
    """Quantize one (out, in) weight with GPTQ.

    Args:
        weight: the float weight.
        hessian: (in, in) H = 2 X^T X / n of the layer's calibration inputs.
        spec: the layer's grid; group scales are computed from the updated weights when a group
            starts. With `act_order` (columns by decreasing diag H) group scales are fixed from the
            original weight first ("static groups"), so groups stay contiguous in the exported
            layout, which has no column permutation.
        damp: fraction of mean(diag H) added to the diagonal.
        block_size: columns per lazy batch update.
    Returns:
        GPTQResult with the weight on the grid and its (scale, zero_point).
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero = rtn_qparams(W, spec)  # fixed unless groups start from updated weights
    dynamic = spec.granularity == "group" and not act_order
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, damp = inverse_cholesky(H, damp)
    group_of = _column_groups(spec, cols, perm, W.device).tolist()
    Q = torch.zeros_like(W)
    error = torch.zeros((), device=W.device)  # a tensor: no device sync per column
    bs = _block_size(spec, block_size)
    for i1 in range(0, cols, bs):
        i2 = min(i1 + bs, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if dynamic and j % spec.group_size == 0:
                g = j // spec.group_size
                lo, hi = W1[:, i:i + spec.group_size].aminmax(dim=1)
                s, z = compute_qparams(lo, hi, spec.bits, spec.symmetric, spec.scale_dtype)
                scale[:, g, 0], zero[:, g, 0] = s, z
            g = group_of[j]
            w, s, z = W1[:, i], scale[:, g, 0], zero[:, g, 0]
            q = dequantize(quantize(w, s, z, spec.bits), s, z)
            Q[:, j] = q
            err = (w - q) / U1[i, i]
            error += err.square().sum() / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return GPTQResult(Q, scale, zero, error.item(), damp)
