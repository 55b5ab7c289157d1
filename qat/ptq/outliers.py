"""Outlier features (Dettmers et al. 2022, LLM.int8()): input channels of a Linear whose
activations exceed a magnitude threshold in a meaningful fraction of tokens.

Such channels make a shared activation (and often weight) range coarse for everything else, so the
layers that read them are the ones to keep at 8 bits, or in float.
"""
from __future__ import annotations

import torch
from torch import nn

from qat.ptq.calibrate import batched_forward, collect_input_stats

THRESHOLD = 6.0  # LLM.int8(): magnitude >= 6 marks an outlier feature
MIN_FRACTION = 0.06  # LLM.int8(): ... in at least ~6% of the sequence positions


@torch.no_grad()
def detect_outliers(model: nn.Module, ids: torch.Tensor, *, threshold: float = THRESHOLD,
                    min_fraction: float = MIN_FRACTION, batch_size: int = 8
                    ) -> dict[str, list[int]]:
    """Outlier input features of every nn.Linear (float activations: fake quantization is off).

    Args:
        model: a causal LM (prepared or not).
        ids: (N, T) calibration token ids.
        threshold: |x| above this counts as an outlier value.
        min_fraction: a feature is reported when that happens in at least this fraction of tokens.
    Returns:
        {layer name: sorted feature indices}, JSON-serialisable; layers without outliers omitted.
    """
    if threshold <= 0 or not 0 < min_fraction <= 1:
        raise ValueError(f"detect_outliers: threshold={threshold!r} must be > 0 and "
                         f"min_fraction={min_fraction!r} in (0, 1]")
    was_training = model.training
    model.eval()
    try:
        stats = collect_input_stats(model, batched_forward(model, ids, batch_size), hessian=False,
                                    threshold=threshold)
    finally:
        model.train(was_training)
    report = {}
    for name, s in stats.items():
        features = torch.nonzero(s.outlier_rows >= min_fraction * s.rows).flatten().tolist()
        if features:
            report[name] = features
    return report


def protected_layers(report: dict[str, list[int]], min_features: int = 1) -> list[str]:
    """Layers with at least `min_features` outlier features: candidates for quant.exclude."""
    return sorted(name for name, features in report.items() if len(features) >= min_features)


def protection_overrides(report: dict[str, list[int]], bits: int = 8, min_features: int = 1
                         ) -> dict[str, dict[str, int]]:
    """QuantConfig.overrides keeping the protected layers at `bits` (exact names as patterns)."""
    return {name: {"bits": bits} for name in protected_layers(report, min_features)}


def find_outliers(model: nn.Module, ids: torch.Tensor, threshold: float) -> dict[str, list[int]]:
    """detect_outliers on the float model, with a summary printed (first ten layers)."""
    found = detect_outliers(model, ids, threshold=threshold)
    print(f"outlier features (|x| >= {threshold}): {len(found)} layer(s)"
          + "".join(f"\n  {name}: {len(f)} feature(s) {f[:8]}" for name, f in list(found.items())[:10]))
    return found
