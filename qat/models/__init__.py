"""Model loading: `ModelSpec` says what, `load_model` builds (model, tokenizer)."""

from qat.models.load import load_model
from qat.models.spec import ModelSpec

__all__ = ["ModelSpec", "load_model"]
