"""The perplexities a run reports, as stages: the float model before anything changes it (cached),
and the fake-quantized model as it would be exported at any point between stages.

Both follow the data spec's protocol (eval_window, eval_windows, eval_batch_size) on the run's
held-out tokens, without a Trainer: no collectives, so every rank may call them.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from qat.assets import cache_dir
from qat.data import DataSpec
from qat.eval.perplexity import PerplexityResult, perplexity
from qat.io import is_rank_zero, write_json


def protocol_ppl(model: torch.nn.Module, eval_ids: torch.Tensor, spec: DataSpec,
                 label: str | None = None) -> float:
    """Perplexity of `model` as it is now on the protocol windows of `eval_ids`."""
    return perplexity(model, eval_ids, window=spec.eval_window, max_windows=spec.eval_windows,
                      batch_size=spec.eval_batch_size,
                      progress=bool(label) and is_rank_zero() and label).ppl


def fingerprint(model: torch.nn.Module, eval_blocks: torch.Tensor) -> str:
    """Digest of the float model, the eval tokens and the software that computes on them.

    A model loaded from a directory is named by its files (path, size and modification time of
    each weights file, and its config), so a 70B model is not read again to be recognised; one
    built in memory (the tiny test model) by its weights."""
    import transformers

    digest = hashlib.sha256(f"{torch.__version__} {transformers.__version__}".encode())
    digest.update(f"{next(model.parameters()).dtype} {model.config.to_json_string()}".encode())
    files = model_files(model)
    if files:
        for path in files:
            stat = path.stat()
            digest.update(f"{path.resolve()} {stat.st_size} {stat.st_mtime_ns}".encode())
    else:
        for name, tensor in sorted(model.state_dict().items()):
            if "fake_quant" in name:
                continue
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    digest.update(eval_blocks.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def model_files(model: torch.nn.Module) -> list:
    """The weights files a model was loaded from (empty when it was built in memory)."""
    from pathlib import Path

    source = Path(str(getattr(model.config, "_name_or_path", "") or ""))
    if not source.name or not source.is_dir():
        return []
    return sorted(source.glob("*.safetensors")) + sorted(source.glob("*.bin"))


def float_ppl(model: torch.nn.Module, eval_ids: torch.Tensor, eval_blocks: torch.Tensor,
              spec: DataSpec, cached: bool) -> float:
    """Protocol perplexity of the float model as it is now; with `cached`, reused when the same
    weights were measured on the same tokens by the same software."""
    path = cache_dir() / "fp_ppl" / f"{fingerprint(model, eval_blocks)}.json"
    if cached and path.is_file():
        return float(json.loads(path.read_text())["fp_ppl"])
    value = protocol_ppl(model, eval_ids, spec, "float ppl")
    if cached and is_rank_zero():
        write_json(path, {"fp_ppl": value})
    return value


def quantized_ppl(model: torch.nn.Module, eval_ids: torch.Tensor, spec: DataSpec, dtype: str,
                  label: str = "quantized ppl") -> float:
    """Protocol perplexity of the fake-quantized model as exported (the rest rounded to `dtype`):
    what `ppl` would be if training stopped here."""
    from qat.export.compressed_tensors import as_exported
    from qat.quant import set_fake_quant_enabled

    set_fake_quant_enabled(model, True)
    was_training = model.training
    with as_exported(model.eval(), getattr(torch, dtype)):
        value = protocol_ppl(model, eval_ids, spec, label)
    model.train(was_training)
    return value


@dataclass(frozen=True)
class FloatReference:
    """The float model on the (W, T) protocol `windows`: its TopK at every scored position (what
    `qat.eval.divergence` compares with) and its perplexity, from one forward pass."""

    top: Any  # qat.eval.divergence.TopK
    ppl: PerplexityResult
    windows: torch.Tensor
    k: int


def float_reference(model: torch.nn.Module, windows: torch.Tensor, k: int, batch_size: int = 4,
                    cached: bool = True, progress: bool | str = False) -> FloatReference:
    """The float model's perplexity and top-k log-probs on the protocol `windows`, computed
    once: cached under the float model's files (`fingerprint`), the windows themselves and k, so
    another model, protocol or k never reads a stale one."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qat.eval.divergence import TopK, TopKCollector
    from qat.io import atomic_path

    windows = windows.cpu().contiguous()
    key = hashlib.sha256(f"{fingerprint(model, windows)} k={k}".encode()).hexdigest()[:32]
    path = cache_dir() / "kl_reference" / f"{key}.safetensors"
    if cached and path.is_file():
        with safe_open(str(path), "pt") as stored:
            top = TopK(*(stored.get_tensor(n) for n in ("logprobs", "ids", "rest")))
            ppl = PerplexityResult(**json.loads(stored.metadata()["ppl"]))
        return FloatReference(top, ppl, windows, k)
    collector = TopKCollector(k)
    ppl = perplexity(model, windows.reshape(-1), window=windows.shape[1],
                     max_windows=windows.shape[0], batch_size=batch_size, progress=progress,
                     on_logits=collector.add)
    top = collector.result()
    if cached and is_rank_zero():
        with atomic_path(path) as tmp:
            save_file({"logprobs": top.logprobs.contiguous(), "ids": top.ids, "rest": top.rest},
                      str(tmp), metadata={"ppl": json.dumps(asdict(ppl))})
    return FloatReference(top, ppl, windows, k)


def float_cloze(model: torch.nn.Module, tokenizer, items: list, cached: bool = True,
                batch_size: int = 8):
    """The float model's `qat.eval.cloze` result on `items`, cached like its perplexity (keyed
    on the model's files and the items' tokens)."""
    from qat.eval.cloze import ClozeResult, cloze_accuracy, encode

    tokens = torch.tensor([t for item in items for part in encode(tokenizer, item)
                           for t in [*part, -1]])
    path = cache_dir() / "cloze" / f"{fingerprint(model, tokens)}.json"
    if cached and path.is_file():
        return ClozeResult(**json.loads(path.read_text()))
    result = cloze_accuracy(model, tokenizer, items, batch_size)
    if cached and is_rank_zero():
        write_json(path, asdict(result))
    return result


@dataclass
class SetBaseline:
    """The float model on one eval set of a run, before anything changes it: its perplexity, the
    top-k reference the final model's KL is taken against (None: eval.kl off), and the cloze
    items with the float model's result on them (none: eval.cloze_items=0 or no item found)."""

    ppl: float
    blocks: torch.Tensor  # the set's (W, T) windows
    reference: FloatReference | None = None
    items: list = field(default_factory=list)
    cloze: Any = None  # qat.eval.cloze.ClozeResult


# metrics.json's prefix per eval set: the in-domain windows ("fp_ppl", "kl_mean", ...),
# data.ood's ("fp_ood_ppl", "ood_ppl", "ood_kl_mean", ...) and data.val_windows' ("val_ppl", ...)
SET_PREFIXES = {"eval": "", "ood": "ood_", "val": "val_"}


@dataclass
class FloatBaseline:
    """What a run measured of its float model, per eval set (SET_PREFIXES)."""

    sets: dict[str, SetBaseline]

    def metrics(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, found in self.sets.items():
            prefix = SET_PREFIXES[name]
            out[f"fp_{prefix}ppl"] = found.ppl
            if found.cloze is not None:
                out[f"fp_{prefix}cloze_acc"] = found.cloze.accuracy
        return out


def float_baseline(model: torch.nn.Module, tokenizer, tokens, data: DataSpec,
                   spec) -> FloatBaseline:
    """The float model's perplexity on the run's eval windows and, with data.ood or
    data.val_windows, on the out-of-domain or validation ones (with eval.kl its top-k from the same pass), and its cloze accuracy on
    items of each set's held-out text, each cached under `spec.cache_fp_ppl`
    (`tokens`: qat.data.tokens.Tokens; `spec`: qat.eval.spec.EvalSpec)."""
    from qat.eval.cloze import cloze_items

    cached = spec.cache_fp_ppl
    sets = {"eval": (tokens.eval_ids, tokens.eval_blocks, tokens.eval_texts)}
    if tokens.ood_blocks is not None:
        sets["ood"] = (tokens.ood_ids, tokens.ood_blocks, tokens.ood_texts)
    if tokens.val_blocks is not None:
        sets["val"] = (None, tokens.val_blocks, None)
    out = FloatBaseline({})
    for name, (ids, blocks, texts) in sets.items():
        label = is_rank_zero() and f"float ppl{' (' + name + ')' if name != 'eval' else ''}"
        if spec.kl:
            reference = float_reference(model, blocks, spec.kl_top_k, data.eval_batch_size,
                                        cached, progress=label)
            found = SetBaseline(reference.ppl.ppl, blocks, reference)
        elif name == "eval":
            found = SetBaseline(float_ppl(model, ids, blocks, data, cached), blocks)
        else:
            found = SetBaseline(windows_ppl(model, blocks, data.eval_batch_size, label), blocks)
        if spec.cloze_items and texts:
            found.items = cloze_items(texts, spec.cloze_items)
            found.cloze = float_cloze(model, tokenizer, found.items, cached) \
                if found.items else None
        out.sets[name] = found
    return out


def windows_ppl(model: torch.nn.Module, blocks: torch.Tensor, batch_size: int,
                progress: bool | str = False, on_logits=None) -> float:
    """Perplexity of `model` on the (W, T) windows `blocks`."""
    return perplexity(model, blocks.reshape(-1), window=blocks.shape[1],
                      max_windows=blocks.shape[0], batch_size=batch_size, progress=progress,
                      on_logits=on_logits).ppl


def final_quality(model: torch.nn.Module, tokenizer, baseline: FloatBaseline, dtype: str,
                  batch_size: int = 4) -> dict[str, Any]:
    """The model as exported (the rest rounded to `dtype`) on what `baseline` measured the float
    model on, per set (SET_PREFIXES): its distance to the float model (kl_mean, kl_p99, kl_max,
    top1, kl_top_k), its cloze result (cloze_acc, cloze_nll, cloze_items), and for the
    out-of-domain and validation sets their perplexity (ood_ppl, val_ppl; the in-domain one is
    the run's `ppl`)."""
    from contextlib import nullcontext

    from qat.eval.cloze import cloze_accuracy
    from qat.eval.divergence import DivergenceMeter
    from qat.export.compressed_tensors import as_exported
    from qat.quant import fake_quant_modules

    out: dict[str, Any] = {}
    quantized = any(True for _ in fake_quant_modules(model))
    with as_exported(model, getattr(torch, dtype)) if quantized else nullcontext():
        for name, found in baseline.sets.items():
            prefix = SET_PREFIXES[name]
            reference = found.reference
            meter = DivergenceMeter(reference.top, reference.k, reference.windows) \
                if reference is not None else None
            if meter is not None or name != "eval":
                ppl = windows_ppl(model, found.blocks, batch_size, is_rank_zero() and (
                    f"KL to float ({name})" if meter else f"ppl ({name})"),
                    meter.add if meter else None)
                if name != "eval":
                    out[f"{prefix}ppl"] = ppl
            if meter is not None:
                out.update({prefix + k: v for k, v in meter.result().to_dict().items()})
            if found.items:
                out.update({prefix + k: v for k, v in
                            cloze_accuracy(model, tokenizer, found.items).to_dict().items()})
    return out
