"""From a spec to masks: scores by method, masks by pattern, each chosen through a small registry."""
from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import nn

from qat.prune.masks import apply_masks, global_masks, nm_mask, target_linears, unstructured_mask
from qat.prune.scores import collect_input_norms, magnitude_score, wanda_score
from qat.prune.spec import PruneSpec
from qat.prune.structured import channel_masks, head_masks

Masks = dict[str, torch.Tensor]


def _score_fn(spec: PruneSpec, input_norms: Mapping[str, torch.Tensor] | None,
              previous: Mapping[str, torch.Tensor] | None) -> Callable[[str, nn.Linear], torch.Tensor]:
    """(name, linear) -> scores, with already-pruned weights at -1 (below any real score).

    That keeps masks nested as a gradual schedule raises sparsity, whatever the ties among zeros.
    """
    if spec.method == "wanda" and input_norms is None:
        raise ValueError("prune.method='wanda' needs input norms: pass input_norms (from "
                         "qat.prune.collect_input_norms) or calibration data")

    def score(name: str, linear: nn.Linear) -> torch.Tensor:
        if spec.method == "wanda":
            if name not in input_norms:
                raise ValueError(f"no calibration input norm for layer {name!r}")
            s = wanda_score(linear.weight, input_norms[name])
        else:
            s = magnitude_score(linear.weight)
        if previous is not None and name in previous:
            s = s.masked_fill(~previous[name].to(s.device), -1.0)
        return s
    return score


def _unstructured(model, spec, sparsity, score) -> Masks:
    linears = target_linears(model, spec.include, spec.exclude)
    scores = {n: score(n, m) for n, m in linears.items()}
    if spec.scope == "global":
        return global_masks(scores, sparsity)
    return {n: unstructured_mask(s, sparsity, spec.scope) for n, s in scores.items()}


def _nm(model, spec, sparsity, score) -> Masks:
    n, m = spec.nm
    bad = [name for name, lin in target_linears(model, spec.include, spec.exclude).items()
           if lin.in_features % m]
    if bad:
        raise ValueError(f"prune.pattern={spec.pattern!r} needs in_features divisible by {m}; "
                         f"layers {bad[:4]} are not: add them to prune.exclude")
    return {name: nm_mask(score(name, lin), n, m)
            for name, lin in target_linears(model, spec.include, spec.exclude).items()}


_PATTERNS: dict[str, Callable[..., Masks]] = {
    "unstructured": _unstructured,
    "nm": _nm,
    "heads": lambda model, spec, sparsity, score: head_masks(model, sparsity, score),
    "channels": lambda model, spec, sparsity, score: channel_masks(model, sparsity, score),
}


@torch.no_grad()
def compute_masks(model: nn.Module, spec: PruneSpec, sparsity: float | None = None,
                  input_norms: Mapping[str, torch.Tensor] | None = None,
                  previous: Mapping[str, torch.Tensor] | None = None) -> Masks:
    """Keep-masks (True = keep) for the spec's layers at `sparsity` (default: the final one).

    Args:
        model: the model whose Linear names the masks use (FakeQuantLinear works too).
        spec: method, pattern, scope and include/exclude; structured patterns ignore
            include/exclude and prune every attention / MLP block alike.
        input_norms: {name: (in,)} from `collect_input_norms`, needed by method=wanda.
        previous: masks already in force; their pruned weights are pruned first again.
    Returns:
        {linear name: (out, in) bool mask on the weight's device}. Not yet applied.
    """
    if not spec.enabled:
        raise ValueError("prune.method='none': there is nothing to prune")
    kind = "nm" if spec.nm else spec.pattern
    sparsity = spec.final_sparsity if sparsity is None else sparsity
    return _PATTERNS[kind](model, spec, sparsity, _score_fn(spec, input_norms, previous))


def calibration_norms(model: nn.Module, spec: PruneSpec, data) -> dict[str, torch.Tensor]:
    """Input norms of every Linear the spec may prune, over `spec.calibration_samples` sequences."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return collect_input_norms(model, data, names, max_samples=spec.calibration_samples)


def prune(model: nn.Module, spec: PruneSpec, calibration=None,
          input_norms: Mapping[str, torch.Tensor] | None = None) -> Masks:
    """One-shot pruning at the final sparsity, in place: compute masks and zero the weights.

    For post-training pruning or a quick baseline; training runs use the schedule's callback
    (qat.lightning.callbacks.PruningCallback).
    """
    if spec.method == "wanda" and input_norms is None and calibration is not None:
        input_norms = calibration_norms(model, spec, calibration)
    masks = compute_masks(model, spec, input_norms=input_norms)
    apply_masks(model, masks)
    return masks


def prune_structured(model: nn.Module, spec: PruneSpec, calibration=None) -> dict:
    """prune.pattern heads / channels: cut them out once, before training, so the student trains
    (and exports) smaller. Returns shrink's result (parameters before/after, config changes)."""
    from qat.prune.structured import shrink

    if spec.schedule != "oneshot" or spec.start_step != 0:
        raise ValueError(f"prune.pattern={spec.pattern!r} removes tensors once, before "
                         "training: use prune.schedule=oneshot with prune.start_step=0")
    result = shrink(model, prune(model, spec, calibration))
    print(f"pruned {spec.pattern}: {result['parameters_before']:,} -> "
          f"{result['parameters_after']:,} parameters ({result['config']})")
    return result


def prune_report(model: nn.Module, spec: PruneSpec, shrunk: dict | None) -> tuple[dict, dict]:
    """(prune_report.json's content, the metrics a run reports: sparsity, parameters, nm_ok)."""
    from qat.prune.masks import sparsity_report

    report = sparsity_report(model, spec.include, spec.exclude, spec.pattern)
    if shrunk:
        report["shrink"] = shrunk
    out = {"sparsity": round(report["overall"]["sparsity"], 6), "parameters": report["parameters"]}
    if spec.nm:
        out["nm_ok"] = all(layer["nm_ok"] for layer in report["layers"].values())
    return report, out
