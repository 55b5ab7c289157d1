"""The integer format every layer shares: the grid (ranges, scales, zero points, quantize and
dequantize) and how codes, scales and zero points are packed into words. Dependency-free (torch
only), so that quant, kernels and export all build on it."""
