"""What a run measures besides its final perplexity (the `eval` group of train.yaml)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EvalSpec:
    """Perplexities measured along a run; each costs one pass over the eval windows. The distance
    to the float model (KL, top-1 agreement) shares the float pass and costs the final model one
    more; the cloze task one pass over its items per model."""

    fp_ppl: bool = True  # the float model before training (metrics.json: fp_ppl)
    cache_fp_ppl: bool = True  # reuse it for the same float weights, tokens and software
    quantized_before: bool = False  # the quantized model before end-to-end training (ptq_ppl)
    stage_ppl: bool = True  # with the block stage: after quant.init and after the block stage
    kl: bool = True  # KL(P_float || P_model) per token and top-1 agreement at the end (with fp_ppl)
    kl_top_k: int = 256  # the float model's log-probs kept per position (the rest: one bucket)
    cloze_items: int = 200  # LAMBADA-style items from the held-out text (qat.eval.cloze); 0: none

    def __post_init__(self) -> None:
        for name in ("fp_ppl", "cache_fp_ppl", "quantized_before", "stage_ppl", "kl"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"eval.{name}={getattr(self, name)!r} must be true or false")
        for name, least in (("kl_top_k", 1), ("cloze_items", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"eval.{name}={value!r} must be an integer >= {least}")
