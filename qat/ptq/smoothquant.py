"""SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights before W8A8.

s_j = max|X_j|^alpha / max|W_j|^(1 - alpha), folded as in qat.ptq.fold. Only the float model
changes (its function is the same); the dynamic per-token activation quantizer and the weight
quantizer then see flatter activations.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.ptq.calibrate import InputStats
from qat.ptq.fold import apply_scale, group_stats, llama_scale_groups, rescale_stats

MIN_SCALE = 1e-5  # keeps s > 0 for channels that never fire


def smoothing_scale(act_max: torch.Tensor, weights: list[torch.Tensor], alpha: float
                    ) -> torch.Tensor:
    """Per-input-channel s from activation absmax (in,) and the absmax over rows of each weight."""
    w_max = torch.stack([w.detach().float().abs().amax(0) for w in weights]).amax(0)
    s = act_max.float().clamp(min=MIN_SCALE).pow(alpha) / w_max.clamp(min=MIN_SCALE).pow(1 - alpha)
    return s.clamp(min=MIN_SCALE)


@torch.no_grad()
def smooth_block(block: nn.Module, prefix: str, stats: dict[str, InputStats],
                 alpha: float) -> dict[str, float]:
    """Fold SmoothQuant scales into one block; returns each group's largest scale (for reports)."""
    info = {}
    for group in llama_scale_groups(block, prefix):
        act_max = torch.stack([x.abs_max for x in group_stats(group, stats)]).amax(0)
        s = smoothing_scale(act_max, [l.weight for l in group.linears.values()], alpha)
        apply_scale(group, s)
        rescale_stats(group, stats, s)
        info[group.name] = s.max().item()
    return info

