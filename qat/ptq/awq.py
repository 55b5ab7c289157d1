"""AWQ (Lin et al. 2023): activation-aware per-input-channel scaling, then optional range clipping.

Salient input channels (large mean |x|) are scaled up in the weight and down in the producer of the
activation, so their weights lose less to rounding. Errors are layer-output errors computed from
the input Gram matrix G = X^T X / n: sum over tokens of |x D^T|^2 / n = trace(D G D^T) for a weight
error D, so no activations are stored between the statistics pass and the search.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.format.grid import compute_qparams, dequantize, quantize
from qat.ptq.calibrate import InputStats
from qat.ptq.fold import apply_scale, llama_scale_groups, rescale_stats
from qat.ptq.rtn import fake_quant, grouped, rtn_qparams
from qat.quant.observers import minmax
from qat.quant.spec import WeightSpec

MIN_SCALE = 1e-4  # llm-awq's floor on mean |x|^alpha
CLIP_SKIP = ("q_proj", "k_proj")  # llm-awq: clipping q/k hurts attention more than MSE shows


def output_error(delta: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """Mean per-token squared output error trace(D G D^T) of a (out, in) weight error D."""
    return ((delta @ gram) * delta).sum()


def scaled_error(weight: torch.Tensor, spec: WeightSpec | None, gram: torch.Tensor,
                 s: torch.Tensor) -> torch.Tensor:
    """Output error of quantizing W * s and undoing s: what AWQ's search minimises."""
    if spec is None:  # a Linear kept in float adds no error
        return torch.zeros((), device=weight.device)
    w = weight.detach().float()
    return output_error(w - fake_quant(w * s, spec) / s, gram)


def search_scale(weights: list[torch.Tensor], specs: list[WeightSpec | None],
                 stats: list[InputStats | None], grid: int) -> tuple[torch.Tensor, float, float]:
    """Best s = mean|x|^alpha (normalised) over alpha in linspace(0, 1, grid).

    `stats`: each weight's input statistics (q/k/v share one object; an MoE layer's experts
    each see their own tokens: each one's error is measured on its tokens, the mean |x| is over
    all of them; None: a reader no token reached, or a float one, which adds no error).
    alpha = 0 is plain RTN, so the chosen scale never has a larger estimated error than RTN.
    Returns (s, alpha, error).
    """
    present = list({id(x): x for x in stats if x is not None}.values())
    mean = sum(x.abs_sum for x in present) / max(sum(x.rows for x in present), 1)
    grams = [x.gram if x is not None else None for x in stats]
    best = (torch.ones_like(mean), 0.0, float("inf"))
    for alpha in torch.linspace(0, 1, grid).tolist():
        s = mean.pow(alpha).clamp(min=MIN_SCALE)
        s = s / (s.max() * s.min()).sqrt()
        err = sum((scaled_error(w, spec, gram, s) for w, spec, gram in zip(weights, specs, grams)
                   if gram is not None), torch.zeros(())).item()
        if err < best[2]:
            best = (s, alpha, err)
    return best


def _diag_blocks(gram: torch.Tensor, spec: WeightSpec) -> torch.Tensor:
    """(groups, k, k) diagonal blocks of G: each group's own share of the output error."""
    if spec.granularity == "channel":
        return gram[None]
    k = spec.group_size
    g = gram.shape[0] // k
    return gram.reshape(g, k, g, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


@torch.no_grad()
def clip_qparams(weight: torch.Tensor, spec: WeightSpec, gram: torch.Tensor, grid: int = 20,
                 max_shrink: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (scale, zero_point) with the range shrunk by the ratio in
    {1, 1 - 1/grid, ..., > 1 - max_shrink} that minimises that group's output error."""
    g = grouped(weight.detach(), spec)  # (rows, groups, k)
    lo, hi = minmax(g)
    blocks = None if spec.granularity == "tensor" else _diag_blocks(gram.float(), spec)
    best_err = torch.full(lo.shape, float("inf"), device=g.device)
    best_scale, best_zero = rtn_qparams(weight, spec)
    for i in range(max(1, int(max_shrink * grid))):
        ratio = 1 - i / grid
        scale, zero = compute_qparams(lo * ratio, hi * ratio, spec.bits, spec.symmetric,
                                      spec.scale_dtype)
        d = g - dequantize(quantize(g, scale, zero, spec.bits), scale, zero)
        if blocks is None:
            err = output_error(d.reshape(weight.shape), gram).reshape(1, 1, 1)
        else:
            err = torch.einsum("rgk,gkl,rgl->rg", d, blocks, d)[..., None]
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zero = torch.where(better, zero, best_zero)
    return best_scale, best_zero


@torch.no_grad()
def scale_block(block: nn.Module, prefix: str, stats: dict[str, InputStats],
                specs: dict[str, WeightSpec | None], grid: int) -> dict[str, float]:
    """Search and fold AWQ scales for every group of one block; returns the alpha of each group."""
    alphas = {}
    for group in llama_scale_groups(block, prefix):
        names = list(group.linears)
        s, alpha, _ = search_scale([group.linears[n].weight for n in names],
                                   [specs.get(n) for n in names], [stats.get(n) for n in names],
                                   grid)
        apply_scale(group, s)
        rescale_stats(group, stats, s)
        alphas[group.name] = alpha
    return alphas


def block_qparams(linears: dict[str, nn.Linear], stats: dict[str, InputStats],
                  specs: dict[str, WeightSpec], clip: bool, grid: int, max_shrink: float
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Static (scale, zero_point) of each quantized Linear: clipped, or min-max of the scaled
    weight."""
    out = {}
    for name, spec in specs.items():
        weight = linears[name].weight
        if clip and not name.endswith(CLIP_SKIP) and name in stats:
            out[name] = clip_qparams(weight, spec, stats[name].gram, grid, max_shrink)
        else:
            out[name] = rtn_qparams(weight, spec)
    return out
