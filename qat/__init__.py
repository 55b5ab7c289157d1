"""qat: quantization-aware training for causal language models.

Kept import-light: `qat.kernels` must import with only torch installed, so nothing heavy is
imported here; `qat.load_quantized` is resolved on first use.
"""

__version__ = "0.1.0"


def load_quantized(directory, dtype=None, device="cpu", **options):
    """Load a compressed-tensors export with packed weights and fused kernels (see qat.export.load;
    `options`: backend, embedding_bits)."""
    import torch

    from qat.export.load import load_quantized as _load
    return _load(directory, dtype=dtype or torch.bfloat16, device=device, **options)
