"""The perplexities a run reports, as stages: the float model before anything changes it (cached),
and the fake-quantized model as it would be exported at any point between stages.

Both follow the data spec's protocol (eval_window, eval_windows, eval_batch_size) on the run's
held-out tokens, without a Trainer: no collectives, so every rank may call them.
"""
from __future__ import annotations

import hashlib
import json

import torch

from qat.assets import cache_dir
from qat.data import DataSpec
from qat.eval.perplexity import perplexity
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


def float_top_k(model: torch.nn.Module, windows: torch.Tensor, k: int, batch_size: int = 4,
                cached: bool = True):
    """The float model's top-k log-probs at every scored position of the (W, T) protocol
    `windows` (the reference of `qat.eval.divergence`), computed once: cached under the float
    model's files (`fingerprint`), the windows themselves and k, so another model, protocol or
    k never reads a stale one."""
    from safetensors.torch import load_file, save_file

    from qat.eval.divergence import TopK, reference_top_k
    from qat.io import atomic_path

    windows = windows.cpu().contiguous()
    key = hashlib.sha256(f"{fingerprint(model, windows)} k={k}".encode()).hexdigest()[:32]
    path = cache_dir() / "kl_reference" / f"{key}.safetensors"
    if cached and path.is_file():
        stored = load_file(str(path))
        return TopK(stored["logprobs"], stored["ids"], stored["rest"])
    reference = reference_top_k(model, windows, k, batch_size)
    if cached and is_rank_zero():
        with atomic_path(path) as tmp:
            save_file({"logprobs": reference.logprobs.contiguous(), "ids": reference.ids,
                       "rest": reference.rest}, str(tmp))
    return reference
