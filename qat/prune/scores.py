"""Importance scores of weights: magnitude, and Wanda's |W| * ||X_j||_2 from calibration activations.

Scores are float32 tensors shaped like the weight (out, in); lower means prune first. Every mask in
qat.prune is computed from scores, so a new criterion only needs a new function here.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """|W| in float32: the classic criterion, free of data."""
    return weight.detach().float().abs()


def wanda_score(weight: torch.Tensor, input_norm: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2.

    A small weight on a feature with large activations matters more than its magnitude says; LLMs have
    a few such outlier features, which magnitude pruning cuts and Wanda keeps.
    Args:
        weight: (out, in).
        input_norm: (in,) L2 norm of each input feature over all calibration tokens.
    """
    if input_norm.shape != (weight.shape[1],):
        raise ValueError(f"input norm of shape {tuple(input_norm.shape)} does not fit a weight of "
                         f"shape {tuple(weight.shape)}; expected ({weight.shape[1]},)")
    return magnitude_score(weight) * input_norm.to(weight.device, torch.float32)[None, :]


def _batches(data, batch_size: int, max_samples: int | None) -> Iterable[torch.Tensor]:
    """Token-id batches (B, T) from a (N, T) tensor or an iterable of tensors / {'input_ids': ...}."""
    if isinstance(data, torch.Tensor):
        data = data.split(batch_size) if data.ndim == 2 else [data[None]]
    seen = 0
    for batch in data:
        ids = batch["input_ids"] if isinstance(batch, Mapping) else batch
        ids = ids if ids.ndim == 2 else ids[None]
        if max_samples is not None:
            if seen >= max_samples:
                return
            ids = ids[: max_samples - seen]
        seen += ids.shape[0]
        yield ids


@torch.no_grad()
def collect_input_norms(model: nn.Module, data, names: Iterable[str] | None = None,
                        max_samples: int | None = None, batch_size: int = 8
                        ) -> dict[str, torch.Tensor]:
    """||X_j||_2 of every input feature of the chosen Linears, over all calibration tokens.

    Sums of squares are accumulated in float32 by forward pre-hooks, so memory is one (in,) vector
    per layer whatever the calibration size. The model runs in eval mode (no dropout, no observer
    updates) and gets its previous mode back.
    Args:
        model: a causal LM (called as model(input_ids)) or any module taking a (B, T) id tensor.
        data: a (N, T) tensor of token ids, or an iterable of (B, T) tensors or dicts with input_ids.
        names: Linear module names to hook; None hooks every nn.Linear.
        max_samples: stop after this many sequences.
    Returns:
        {name: (in_features,) float32 norm on the layer's device}.
    """
    modules = dict(model.named_modules())
    chosen = list(names) if names is not None else \
        [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    sums = {n: torch.zeros(modules[n].in_features, device=modules[n].weight.device) for n in chosen}

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])  # (tokens, in)
            sums[name] += x.pow(2).sum(dim=0)
        return hook

    handles = [modules[n].register_forward_pre_hook(hook_for(n)) for n in chosen]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        for ids in _batches(data, batch_size, max_samples):
            model(ids.to(device))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return {n: s.sqrt() for n, s in sums.items()}
