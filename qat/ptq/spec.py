"""PTQSpec: how post-training quantization calibrates a prepared model (the Hydra group `ptq`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

METHODS = ("rtn", "gptq", "awq", "smoothquant")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"ptq.{name}={value!r} is not allowed; {allowed}")


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        _fail(name, value, "it must be a positive integer")


def _fraction(name: str, value: Any, low: float, high: float, closed_low: bool) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        (low <= value if closed_low else low < value) and value <= high
    if not ok:
        _fail(name, value, f"it must be a number in {'[' if closed_low else '('}{low}, {high}]")


@dataclass(frozen=True)
class PTQSpec:
    """Post-training quantization of a model already `prepare`d with FakeQuantLinear layers."""

    method: str = "gptq"  # rtn | gptq | awq | smoothquant
    calibration_samples: int = 128  # sequences of calibration data (GPTQ/AWQ papers use 128)
    seq_len: int = 256  # tokens per calibration sequence (for whoever draws the data)
    batch_size: int = 8  # sequences per forward pass during calibration
    damp: float = 0.01  # gptq: fraction of mean(diag H) added to the diagonal
    block_size: int = 128  # gptq: columns per lazy batch update (speed only)
    # gptq: Hessians (float32, in_features^2 each) gathered per pass over a block; an MoE block
    # whose experts' Hessians exceed it is calibrated in several passes, a part of its experts
    # each (the same results: every pass reads the block as it was before any update)
    hessian_gib: float = 4.0
    act_order: bool = True  # gptq: columns by decreasing diag H, static group scales (measured better)
    awq_grid: int = 20  # awq: alphas tried in [0, 1] for s = mean|x|^alpha
    awq_clip: bool = True  # awq: search a per-group range shrink, kept as static qparams
    awq_clip_grid: int = 20  # awq: shrink step is 1 / awq_clip_grid
    awq_max_shrink: float = 0.5  # awq: ranges shrink by less than this fraction
    smoothquant_alpha: float = 0.5  # smoothquant: migration strength (0: none, 1: all to weights)
    progress: bool = True  # tqdm bar over decoder blocks
    sensitivity_samples: int = 4  # quant.budget_bits: sequences for per-block sensitivity
    outliers: str = "off"  # off | report (outliers.json) | protect (their layers stay at 8 bits)
    outlier_threshold: float = 6.0  # LLM.int8(): |x| >= 6 in >= 6% of tokens marks a feature

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", self.method, f"choose one of {list(METHODS)}")
        for name in ("calibration_samples", "seq_len", "batch_size", "block_size", "awq_grid",
                     "awq_clip_grid", "sensitivity_samples"):
            _positive_int(name, getattr(self, name))
        _fraction("damp", self.damp, 0.0, 1.0, closed_low=False)
        if not isinstance(self.hessian_gib, (int, float)) or isinstance(self.hessian_gib, bool) \
                or not self.hessian_gib > 0:
            _fail("hessian_gib", self.hessian_gib, "it must be a number > 0")
        _fraction("awq_max_shrink", self.awq_max_shrink, 0.0, 1.0, closed_low=False)
        _fraction("smoothquant_alpha", self.smoothquant_alpha, 0.0, 1.0, closed_low=True)
        if self.outliers not in ("off", "report", "protect"):
            _fail("outliers", self.outliers, "choose one of ['off', 'report', 'protect']")
        if not isinstance(self.outlier_threshold, (int, float)) or self.outlier_threshold <= 0:
            _fail("outlier_threshold", self.outlier_threshold, "it must be a number > 0")
        for name in ("act_order", "awq_clip", "progress"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "it must be true or false")
