"""Export: the served model in memory (`convert`), the compressed-tensors checkpoint writer and
reader, and what each serving target can run. The integer packing itself is qat.format."""
from qat.export.convert import convert

__all__ = ["convert"]
