"""Protocol perplexity of anything we produce: a float model, a training run, or an export.

The token ids are built by the functions a run uses (qat.data.tokens, qat.data.protocol:
same split, same join, same tokenization), without tokenizing a training split nobody scores here;
the windows and the NLL pooling are `qat.eval.perplexity`'s. So a run's `ppl` in metrics.json and this module's
number for the same run directory agree.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.data.protocol import EvalSet
from qat.eval.cloze import ITEMS
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


@dataclass
class Loaded:
    """A source ready to evaluate: the model, its tokenizer, the context to evaluate it under
    and its kind."""

    model: nn.Module
    tokenizer: Any
    context: Any
    kind: str


def load_for_eval(source: str | Path, backend: str = "auto",
                  embedding_bits: int | None = None) -> Loaded:
    """Any source, loaded to be evaluated.

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
        return Loaded(model, tokenizer, context, kind)
    if kind == "export":
        from transformers import AutoTokenizer

        from qat.export.load import load_quantized

        model = load_quantized(path, dtype=torch.float32, backend=backend,
                               embedding_bits=embedding_bits)
        return Loaded(model, AutoTokenizer.from_pretrained(str(path)), nullcontext(), kind)
    from qat.models import ModelSpec, load_model

    name = {"smollm2": "smollm2-135m"}.get(str(source), str(source))
    spec = ModelSpec(path=str(path)) if path.is_dir() else ModelSpec(name=name)
    model, tokenizer = load_model(spec)
    return Loaded(model, tokenizer, nullcontext(), kind)


def export_base(path: Path) -> str | None:
    """The float model an export was made from: the one its card names (`qat_base_model`, as
    the run's model spec said it, or the hub `base_model`), else the directory its config.json
    was saved from (`_name_or_path`), when that is still there."""
    card = path / "README.md"
    named = {}
    if card.is_file():
        head = card.read_text().split("---")
        if len(head) > 2:
            named = dict(line.split(":", 1) for line in head[1].splitlines() if ":" in line)
    for key in ("qat_base_model", "base_model"):
        value = named.get(key, "").strip()
        if value and (not value.startswith(("/", ".", "~")) or Path(value).expanduser().is_dir()):
            return value
    source = json.loads((path / "config.json").read_text()).get("_name_or_path")
    if source and Path(source).expanduser().is_dir() and not Path(source).samefile(path):
        return str(source)
    return None


def evaluate(source: str | Path, sets: list[EvalSet], window: int = 512, batch_size: int = 4,
             backend: str = "auto", progress: bool = False,
             embedding_bits: int | None = None, device: str = "auto",
             reference: str | Path | None = "auto", kl_top_k: int = 256,
             cloze: int = ITEMS, then: Callable[[Loaded], Any] | None = None) -> dict[str, Any]:
    """Perplexity of `source` on every set, computed on `device` (qat.models.placement: auto,
    cpu, cuda, cuda:N; one block at a time when the model does not fit there), and accuracy on
    `cloze` items of each set's held-out text (`qat.eval.cloze`; 0: none). With a float
    `reference` model ("auto": the one the run or export was made from, when it can be found),
    also the divergence of the next-token distributions from the reference's on the same
    positions, in the same forward pass (`qat.eval.divergence`; the reference's top `kl_top_k`
    and its own perplexity and cloze accuracy are cached). `then(loaded)` runs last, on the
    model as evaluated (the harness); its result is the output's "then".

    Returns:
        {"source", "kind", "window", "results": {set name: {"corpus", "ppl", "nll_sum",
        "n_tokens", "n_windows", "seconds"[, "kl_mean", "kl_p99", "kl_max", "top1",
        "kl_top_k"][, "cloze_acc", "cloze_nll", "cloze_items"]}}[, "reference": {"source",
        "results": {set name: {"ppl"[, "cloze_acc", ...]}}}]}: JSON-ready.
    """
    from qat.data.protocol import eval_windows, held_out_texts
    from qat.data.text import tokenize
    from qat.eval.cloze import cloze_accuracy, cloze_items
    from qat.eval.divergence import DivergenceMeter

    where = stage_device(device, field="--device")  # checked before the model loads
    if cloze < 0:
        raise ValueError(f"--cloze {cloze}: must be >= 0 (0: no cloze task)")
    texts = {s.name: held_out_texts(s) for s in sets}
    items = {name: cloze_items(t, cloze) for name, t in texts.items()} if cloze else {}
    items = {name: found for name, found in items.items() if found}
    if reference == "auto":
        reference = default_reference(source)
    refs = {}
    if reference and sets:
        refs = float_references(reference, texts, items, window, {s.name: s.windows for s in sets},
                                kl_top_k, batch_size, where)
    loaded = load_for_eval(source, backend, embedding_bits)
    model, tokenizer = loaded.model, loaded.tokenizer
    out: dict[str, Any] = {"source": str(source), "kind": loaded.kind, "window": window,
                           "results": {}}
    with loaded.context, computing_on(model, where):
        for eval_set in sets:
            ids = tokenize(tokenizer, texts[eval_set.name])
            ref = refs.get(eval_set.name)
            meter = None
            if ref is not None:
                if not torch.equal(eval_windows(ids, window, eval_set.windows), ref["top"].windows):
                    raise ValueError(f"--reference {reference}: its tokenizer cuts the "
                                     f"{eval_set.name} text into other tokens than {source}'s; "
                                     "KL compares distributions over the same tokens")
                meter = DivergenceMeter(ref["top"].top, kl_top_k, ref["top"].windows)
            result: PerplexityResult = perplexity(model, ids, window=window,
                                                  max_windows=eval_set.windows,
                                                  batch_size=batch_size,
                                                  progress=progress and f"ppl {eval_set.name}",
                                                  on_logits=meter.add if meter else None)
            row = out["results"][eval_set.name] = {"corpus": eval_set.corpus, **asdict(result)}
            if meter is not None:
                row.update(meter.result().to_dict())
            if eval_set.name in items:
                row.update(cloze_accuracy(model, tokenizer, items[eval_set.name]).to_dict())
        if then is not None:
            out["then"] = then(loaded)
    if refs:
        out["reference"] = {"source": str(reference), "results": {
            name: {"ppl": ref["top"].ppl.ppl, **(ref["cloze"].to_dict() if "cloze" in ref else {})}
            for name, ref in refs.items()}}
    return out


def default_reference(source: str | Path) -> str | None:
    """The float model a run or an export names (its model spec, its config's source dir or
    card), when it can be loaded here; None for a float model or when it cannot be found."""
    kind = source_kind(source)
    path = Path(source).expanduser()
    if kind == "export":
        return export_base(path)
    if kind == "run":
        from qat.models.checkpoint import read_checkpoint

        ckpt = path if path.is_file() else path / "checkpoints" / "last.ckpt"
        spec = read_checkpoint(ckpt, tensors=False)["qat"]["config"].get("model") or {}
        if spec.get("path"):
            return spec["path"] if Path(spec["path"]).expanduser().is_dir() else None
        return spec.get("name")
    return None


def float_references(reference: str | Path, texts: dict[str, list[str]], items: dict,
                     window: int, windows: dict[str, int], k: int, batch_size: int,
                     where) -> dict[str, dict[str, Any]]:
    """The float `reference` model on each set: {"top": FloatReference (its top-k and
    perplexity on the windows), "cloze": ClozeResult}, cached; the model is freed before the
    evaluated one loads. Raises ValueError naming --reference when it is not a float model."""
    from qat.data.protocol import eval_windows
    from qat.data.text import tokenize
    from qat.eval.stage import float_cloze, float_reference

    try:
        kind = source_kind(reference)
    except FileNotFoundError as err:
        raise ValueError(f"--reference {reference}: {err}") from err
    if kind != "float":
        raise ValueError(f"--reference {reference}: a {kind}; the reference is the float model "
                         "(a Hugging Face model dir, a builtin name or a hub id)")
    loaded = load_for_eval(reference)
    out: dict[str, dict[str, Any]] = {}
    with computing_on(loaded.model, where):
        for name, text in texts.items():
            ids = eval_windows(tokenize(loaded.tokenizer, text), window, windows[name])
            out[name] = {"top": float_reference(loaded.model, ids, k, batch_size)}
            if name in items:
                out[name]["cloze"] = float_cloze(loaded.model, loaded.tokenizer, items[name])
    return out
