"""Masks from scores: unstructured (layer, row or global) and N:M; applying, checking, reporting.

A mask is a bool tensor shaped like the weight, True where the weight is kept. Counts are exact:
`round(sparsity * numel)` weights go, ties in score broken by position, so a report of 50% means
exactly half, which is what a compressed format or a sparse kernel will see.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from torch import nn

from qat.models.structure import block_patterns, is_conv1d, is_projection
from qat.quant.swap import matches


def target_linears(model: nn.Module, include: Iterable[str] | None, exclude: Iterable[str]
                   ) -> dict[str, nn.Linear]:
    """The nn.Linear modules (FakeQuantLinear included) chosen by fnmatch include/exclude patterns
    (include None: every projection inside the decoder blocks)."""
    include = block_patterns(model) if include is None else tuple(include)
    exclude = tuple(exclude)
    chosen = {n: m for n, m in model.named_modules() if is_projection(m)
              and any(matches(n, p) for p in include) and not any(matches(n, p) for p in exclude)}
    if not chosen:
        raise ValueError(f"prune.include={list(include)} / prune.exclude={list(exclude)} select no "
                         "Linear module")
    conv = [n for n, m in chosen.items() if is_conv1d(m)]
    if conv:
        raise ValueError(f"prune: {conv[:3]} are Conv1D layers (GPT-2 style, weights stored "
                         "transposed); call qat.models.structure.linearize(model) first")
    return chosen


def _keep_largest(flat: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask of a 1-D score vector with exactly `n_prune` of the lowest scores removed.

    A threshold (kthvalue) plus a fill among ties keeps memory at one bool per score, which matters
    for a global mask over every weight of the model.
    """
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune <= 0:
        return keep
    threshold = flat.kthvalue(n_prune).values
    below = flat < threshold
    keep &= ~below
    ties = (flat == threshold).nonzero().squeeze(1)
    keep[ties[: n_prune - int(below.sum())]] = False
    return keep


def unstructured_mask(score: torch.Tensor, sparsity: float, scope: str = "layer") -> torch.Tensor:
    """Keep-mask of one (out, in) layer: the lowest `sparsity` fraction of the layer, or of each
    output row (scope='row', Wanda's comparison group: every output keeps the same fan-in)."""
    if scope == "row":
        n_prune = round(sparsity * score.shape[1])
        keep = torch.ones_like(score, dtype=torch.bool)
        if n_prune:
            keep.scatter_(1, score.topk(n_prune, dim=1, largest=False).indices, False)
        return keep
    return _keep_largest(score.flatten(), round(sparsity * score.numel())).view(score.shape)


def global_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """Keep-masks with one threshold over all layers: layers with many small weights lose more."""
    names = list(scores)
    flat = torch.cat([scores[n].flatten() for n in names])
    keep = _keep_largest(flat, round(sparsity * flat.numel()))
    parts = keep.split([scores[n].numel() for n in names])
    return {n: part.view(scores[n].shape) for n, part in zip(names, parts)}


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask where every M consecutive input weights of a row keep exactly their N best.

    This is the layout sparse tensor cores accelerate (2:4), grouped along the input dimension.
    """
    out_features, in_features = score.shape
    if in_features % m:
        raise ValueError(f"N:M pruning with M={m} needs in_features divisible by {m}, got "
                         f"{in_features}; exclude that layer or choose another M")
    groups = score.reshape(out_features, in_features // m, m)  # (out, in/M, M)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.view(score.shape)


def check_nm(tensor: torch.Tensor, n: int, m: int) -> bool:
    """True when every group of M consecutive entries along the last dim has at most N nonzeros.

    Works on any (…, in) weight: float, dequantized export weights, or a keep-mask.
    """
    if tensor.shape[-1] % m:
        return False
    groups = tensor.reshape(-1, m)
    return bool(((groups != 0).sum(dim=1) <= n).all())


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place (the Parameter itself, so optimizers and FakeQuantLinear
    see the same tensor). Masks are moved to the weight's device when needed."""
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        weight = modules[name].weight
        weight.masked_fill_(~_like(keep.to(weight.device), weight), 0)


def _like(mask: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The mask laid out as the weight is: sharded as an FSDP2 (DTensor) weight is, each rank
    keeping its own rows of the full mask every rank holds (no communication)."""
    mesh = getattr(weight, "device_mesh", None)
    if mesh is None:
        return mask
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(mask, mesh, weight.placements, src_data_rank=None)


def mask_sparsity(masks: Mapping[str, torch.Tensor]) -> float:
    """Fraction of masked-out weights over all masks."""
    total = sum(k.numel() for k in masks.values())
    return sum(int((~k).sum()) for k in masks.values()) / max(total, 1)


@torch.no_grad()
def sparsity_report(model: nn.Module, include: Iterable[str] | None = None,
                    exclude: Iterable[str] = ("*lm_head", "*embed*"), pattern: str = "unstructured"
                    ) -> dict:
    """JSON-ready per-layer zeros of the chosen Linears' weights, as the model holds them now.

    Counted from the weights, not the masks, so it also checks that pruned weights stayed zero; for
    an N:M pattern each layer also says whether it satisfies it. `parameters` is the model's total,
    which is what structured pruning shrinks.
    """
    from qat.prune.spec import parse_nm

    nm = parse_nm(pattern)
    layers, zeros, numel = {}, 0, 0
    for name, linear in target_linears(model, include, exclude).items():
        w = linear.weight
        z = int((w == 0).sum())
        layers[name] = {"zeros": z, "numel": w.numel(), "sparsity": z / w.numel()}
        if nm:
            layers[name]["nm_ok"] = check_nm(w, *nm)
        zeros, numel = zeros + z, numel + w.numel()
    return {"pattern": pattern, "layers": layers,
            "overall": {"zeros": zeros, "numel": numel, "sparsity": zeros / max(numel, 1)},
            "parameters": sum(p.numel() for p in model.parameters())}
