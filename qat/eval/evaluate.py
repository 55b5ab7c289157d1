"""Protocol perplexity of anything we produce: a float model, a training run, or an export.

The token ids are built by the functions a run uses (qat.data.tokens, qat.data.protocol:
same split, same join, same tokenization), without tokenizing a training split nobody scores here;
the windows and the NLL pooling are `qat.eval.perplexity`'s. So a run's `ppl` in metrics.json and this module's
number for the same run directory agree.
"""
from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.data.protocol import EvalSet, held_out_ids
from qat.eval.perplexity import PerplexityResult, perplexity
from qat.models.placement import computing_on, stage_device

KINDS = ("float", "run", "export")


def source_kind(source: str | Path) -> str:
    """"run" (a run dir or .ckpt), "export" (config.json with quantization_config) or "float"."""
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".ckpt" or (path / "checkpoints" / "last.ckpt").is_file():
        return "run"
    config = path / "config.json"
    if config.is_file() and "quantization_config" in json.loads(config.read_text()):
        return "export"
    if path.is_dir() and not config.is_file():
        raise FileNotFoundError(f"{path}: neither a run dir (checkpoints/last.ckpt), an export nor a "
                                "model dir (config.json)")
    return "float"


def load_for_eval(source: str | Path, backend: str = "auto",
                  embedding_bits: int | None = None) -> tuple[nn.Module, Any, Any, str]:
    """(model, tokenizer, context manager to evaluate under, kind) for any source.

    A run's fake-quantized model is evaluated with its float tensors rounded to the run's export
    dtype (`as_exported`), exactly as train.py measured its final `ppl`; an export loads with the
    fused kernels and float32 for the non-quantized layers, as train.py measures `export_ppl`.
    """
    kind = source_kind(source)
    path = Path(source).expanduser()
    if kind == "run":
        from qat.models.checkpoint import model_from_checkpoint
        from qat.export.compressed_tensors import as_exported
        from qat.quant import fake_quant_modules

        ckpt = path if path.is_file() else path / "checkpoints" / "last.ckpt"
        model, tokenizer, config = model_from_checkpoint(ckpt)
        dtype = (config.get("export") or {}).get("dtype", "bfloat16")
        quantized = any(True for _ in fake_quant_modules(model))
        context = as_exported(model, getattr(torch, dtype)) if quantized else nullcontext()
        return model, tokenizer, context, kind
    if kind == "export":
        from transformers import AutoTokenizer

        from qat.export.load import load_quantized

        model = load_quantized(path, dtype=torch.float32, backend=backend,
                               embedding_bits=embedding_bits)
        return model, AutoTokenizer.from_pretrained(str(path)), nullcontext(), kind
    from qat.models import ModelSpec, load_model

    name = {"smollm2": "smollm2-135m"}.get(str(source), str(source))
    spec = ModelSpec(path=str(path)) if path.is_dir() else ModelSpec(name=name)
    model, tokenizer = load_model(spec)
    return model, tokenizer, nullcontext(), kind


def evaluate(source: str | Path, sets: list[EvalSet], window: int = 512, batch_size: int = 4,
             backend: str = "auto", progress: bool = False,
             embedding_bits: int | None = None, device: str = "auto",
             reference: str | Path | None = None, kl_top_k: int = 256) -> dict[str, Any]:
    """Perplexity of `source` on every set, computed on `device` (qat.models.placement: auto,
    cpu, cuda, cuda:N; one block at a time when the model does not fit there); with a float
    `reference` model, also the divergence of its next-token distributions from the
    reference's on the same positions (`qat.eval.divergence`, the reference's top `kl_top_k`
    cached).

    Returns:
        {"source", "kind", "window", "results": {set name: {"corpus", "ppl", "nll_sum",
        "n_tokens", "n_windows", "seconds"[, "kl_mean", "kl_p99", "kl_max", "top1",
        "kl_top_k"]}}}: JSON-ready.
    """
    from qat.data.protocol import eval_windows

    where = stage_device(device, field="--device")  # checked before the model loads
    model, tokenizer, context, kind = load_for_eval(source, backend, embedding_bits)
    ids = {s.name: held_out_ids(tokenizer, s) for s in sets}
    references = reference_top_ks(reference, {s.name: eval_windows(ids[s.name], window, s.windows)
                                              for s in sets},
                                  kl_top_k, batch_size, where) if reference else {}
    out: dict[str, Any] = {"source": str(source), "kind": kind, "window": window, "results": {}}
    with context, computing_on(model, where):
        for eval_set in sets:
            result: PerplexityResult = perplexity(model, ids[eval_set.name], window=window,
                                                  max_windows=eval_set.windows,
                                                  batch_size=batch_size,
                                                  progress=progress and f"ppl {eval_set.name}")
            out["results"][eval_set.name] = {"corpus": eval_set.corpus, **asdict(result)}
            if eval_set.name in references:
                from qat.eval.divergence import divergence

                top, windows = references[eval_set.name]
                out["results"][eval_set.name].update(
                    divergence(model, top, windows, kl_top_k, batch_size).to_dict())
    return out


def reference_top_ks(reference: str | Path, windows: dict[str, torch.Tensor], k: int,
                     batch_size: int, where) -> dict[str, tuple[Any, torch.Tensor]]:
    """The float `reference` model's top-k on each set's windows (cached), the model freed
    before the evaluated one computes. Raises ValueError naming --reference when it is not a
    float model."""
    from qat.eval.stage import float_top_k

    try:
        kind = source_kind(reference)
    except FileNotFoundError as err:
        raise ValueError(f"--reference {reference}: {err}") from err
    if kind != "float":
        raise ValueError(f"--reference {reference}: a {kind}; the reference is the float model "
                         "(a Hugging Face model dir, a builtin name or a hub id)")
    model = load_for_eval(reference)[0]
    with computing_on(model, where):
        return {name: (float_top_k(model, w, k, batch_size), w) for name, w in windows.items()}
