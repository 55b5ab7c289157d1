"""Inference kernels for packed quantized Linear layers.

Importable with torch alone: Triton is imported only when a CUDA forward (or a test) needs it.
"""
from qat.kernels.linear import QuantizedLinear, triton_available
from qat.format.reference import dequantize_weight, linear_reference

__all__ = ["QuantizedLinear", "dequantize_weight", "linear_reference", "triton_available"]
