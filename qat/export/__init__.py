"""Export: bit packing and the compressed-tensors checkpoint writer/reader.

Kept import-light on purpose: the inference kernels import `qat.export.pack` with only torch installed.
"""
