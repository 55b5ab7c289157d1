"""What a run measures besides its final perplexity (the `eval` group of train.yaml)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSpec:
    """Perplexities measured along a run; each costs one pass over the eval windows."""

    fp_ppl: bool = True  # the float model before training (metrics.json: fp_ppl)
    cache_fp_ppl: bool = True  # reuse it for the same float weights, tokens and software
    quantized_before: bool = False  # the quantized model before end-to-end training (ptq_ppl)
    stage_ppl: bool = True  # with the block stage: after quant.init and after the block stage

    def __post_init__(self) -> None:
        for name in ("fp_ppl", "cache_fp_ppl", "quantized_before", "stage_ppl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"eval.{name}={getattr(self, name)!r} must be true or false")
