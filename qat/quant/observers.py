"""Observers track the range a quantizer must cover; they hold state that checkpoints carry."""
from __future__ import annotations

import torch
from torch import nn

from qat import native


def minmax(grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min and max over the last dim, kept as (rows, groups, 1); one native pass over a
    float32 CPU tensor (torch's amin and amax are two, and aminmax is slower still on a CPU)."""
    if not grouped.requires_grad and native.minmax_supported(grouped):
        return native.minmax(grouped)
    return grouped.amin(dim=-1, keepdim=True), grouped.amax(dim=-1, keepdim=True)


class MinMaxObserver(nn.Module):
    """The range of the current tensor, every call: weights change every step, so follow them."""

    def forward(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return minmax(grouped.detach())


class MovingAverageObserver(nn.Module):
    """Exponential moving average of per-group min and max, smoothing step-to-step jitter."""

    def __init__(self, averaging_constant: float = 0.01) -> None:
        super().__init__()
        self.averaging_constant = averaging_constant
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    def forward(self, grouped: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cur_min, cur_max = minmax(grouped.detach().float())
        if self.min_val.numel() == 0 or self.min_val.shape != cur_min.shape:
            self.min_val, self.max_val = cur_min.clone(), cur_max.clone()
        elif self.training:
            c = self.averaging_constant
            self.min_val.add_(c * (cur_min - self.min_val))
            self.max_val.add_(c * (cur_max - self.max_val))
        return self.min_val, self.max_val

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Buffers start empty; take the checkpoint's shape so resume restores the averages.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


OBSERVER_REGISTRY = {
    "minmax": lambda spec: MinMaxObserver(),
    "moving_average": lambda spec: MovingAverageObserver(spec.averaging_constant),
}


def build_observer(spec) -> nn.Module:
    return OBSERVER_REGISTRY[spec.observer](spec)
