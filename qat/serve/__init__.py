"""Serving an export: the lean greedy decode loop (decode) and text generation (generate, the
qat-generate command)."""
