"""The export stage: convert in memory, write compressed-tensors pack-quantized, read it back and
check it, and measure what the served model weighs (and, given a measure, scores)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from qat.export.spec import ExportSpec
from qat.io import release_memory


def export(model: torch.nn.Module, tokenizer, out_dir: Path, spec: ExportSpec,
           card: dict[str, Any] | None = None,
           measure: Callable[[torch.nn.Module], float] | None = None,
           inplace: bool = False) -> dict[str, Any]:
    """Write `model` (fake-quantized, or converted in export.dtype) to `out_dir`; returns export_dir, export_bytes,
    export_weight_bytes, export_eval_backend and, with `measure`, export_ppl.

    The evaluated model is the in-memory conversion; the files are read back shard by shard and
    must hold the same tensors (the check that what was measured is what was written).
    `card`: the model card's facts about the run (see `qat.export.writer.export_model`).
    `measure`: the perplexity of a served model (spec.evaluate); None skips it.
    `inplace`: convert `model` itself (its last use: no copy of the model is made).
    """
    from qat.export.convert import cast_float_tensors, convert, serve_as
    from qat.export.load import weight_bytes
    from qat.export.verify import check_files_hold
    from qat.export.writer import export_model
    from qat.kernels import QuantizedLinear

    dtype = getattr(torch, spec.dtype)
    from qat.quant.modules import FakeQuantLinear

    # as load_quantized(out_dir, dtype) serves it (or converted already: served_from_checkpoint)
    served = convert(model, dtype, inplace=inplace) \
        if any(isinstance(m, FakeQuantLinear) for m in model.modules()) else model
    release_memory()  # the codes' and the conversion's freed memory, back to the kernel
    export_model(served, tokenizer, out_dir, dtype=dtype, run=card,
                 max_shard_bytes=spec.max_shard_bytes)
    result: dict[str, Any] = {"export_dir": str(out_dir), "export_eval_backend": spec.eval_backend,
                              "export_bytes": sum(f.stat().st_size for f in out_dir.iterdir()),
                              "export_weight_bytes": weight_bytes(served)["total"]}
    # Stored tensors upcast exactly to float32. backend=reference unpacks the stored codes and
    # computes in float32: it checks the export against the run's ppl to float rounding.
    # backend=auto runs the CPU int4 kernel, whose bf16 activations move ppl by ~4e-4.
    cast_float_tensors(served, torch.float32)
    for layer in served.modules():
        if isinstance(layer, QuantizedLinear):
            serve_as(layer, layer.weight_spec, spec.eval_backend)
    check_files_hold(served, out_dir)
    if spec.evaluate and measure is not None:
        result["export_ppl"] = measure(served)
    return result
