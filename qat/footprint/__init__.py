"""The qat-footprint command (python -m qat.footprint); the arithmetic is qat.eval.footprint."""
