"""Model loading: `ModelSpec` says what, `load_model` builds (model, tokenizer).

Imported on first use, so that the parts of qat.models that need only torch (structure, experts,
blocks) import where transformers is absent (the GPU machine's benches)."""

__all__ = ["ModelSpec", "load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from qat.models.load import load_model

        return load_model
    if name == "ModelSpec":
        from qat.models.spec import ModelSpec

        return ModelSpec
    raise AttributeError(f"module 'qat.models' has no attribute {name!r}")
