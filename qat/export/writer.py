"""`export_model`: a Hugging Face model directory in compressed-tensors `pack-quantized` format.

Written into a temporary directory, re-opened and checked, then renamed: a crash leaves no half
export under the real name.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from qat.export.card import model_card
from qat.export.compressed_tensors import stored_tensors
from qat.export.convert import convert
from qat.export.serving import serving_report
from qat.format.schema import quantization_config
from qat.format.shards import INDEX_FILE, plan_shards, shard_name, weight_files, iter_tensors
from qat.io import atomic_path
from qat.kernels import QuantizedLinear
from qat.quant.modules import FakeQuantLinear
from qat.models.experts import checkpoint_module, per_expert_checkpoint, vllm_reads_experts
from qat.models.structure import decoder_blocks, source_class
from qat.quant.swap import LayerReport


def export_model(model: nn.Module, tokenizer, out_dir: str | Path,
                 dtype: torch.dtype = torch.bfloat16, run: dict[str, Any] | None = None,
                 max_shard_bytes: int | None = None) -> Path:
    """Write `model` and `tokenizer` to `out_dir`: a fake-quantized model (FakeQuantLinear layers,
    converted here) or one that `qat.export.convert` already converted (QuantizedLinear layers).

    Quantized Linears are stored packed with their scales (and zero points); every other tensor in
    `dtype`. `run`: what the model card says about how it was made (base_model, recipe, command,
    fp_ppl, ppl, eval). `max_shard_bytes`: weights files of at most this size (Hugging Face's
    sharded convention, with model.safetensors.index.json); None: one model.safetensors.
    Returns the directory.
    """
    out_dir = Path(out_dir)
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        model = convert(model, dtype)
    tensors, specs, ignore = stored_tensors(model, dtype)
    if not specs:
        raise ValueError("export: the model has no fake-quantized Linear; run qat.quant.prepare first")
    config = model.config.to_dict()
    # layers whose own class is not nn.Linear (Conv1D, FalconLinear) are targeted by name
    by_name = any(source_class(m) != "Linear" for m in model.modules()
                  if isinstance(m, QuantizedLinear))
    schemes = {name: spec.scheme for name, spec in specs.items()}
    config["quantization_config"] = quantization_config(schemes, ignore, by_name=by_name)
    config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_path(out_dir, is_dir=True) as tmp:
        tmp.mkdir(parents=True, exist_ok=True)
        write_weights(tensors, tmp, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _portable_tokenizer_config(tmp / "tokenizer_config.json")
        layers = _layers(model)
        blocks = decoder_blocks(model)[0] + "."
        report = serving_report(layers, {k: v.numel() for k, v in tensors.items()
                                         if v.is_floating_point() and v.ndim >= 2
                                         and k.startswith(blocks) and k.endswith(".weight")})
        (tmp / SERVING_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (tmp / CARD_FILE).write_text(model_card(layers, tensors, report, ignore, run))
        verify_export(tmp, expected=tensors)
    return out_dir


SERVING_FILE = "serving_report.json"
CARD_FILE = "README.md"
# transformers 5 names its fast tokenizer TokenizersBackend; releases before 5 (pyproject admits
# >= 4.46) know it as PreTrainedTokenizerFast, which 5 still maps to the same class
PORTABLE_TOKENIZER_CLASSES = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def _portable_tokenizer_config(path: Path) -> None:
    if not path.is_file():
        return
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class")
    if name in PORTABLE_TOKENIZER_CLASSES:
        config["tokenizer_class"] = PORTABLE_TOKENIZER_CLASSES[name]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _layers(model: nn.Module) -> list[LayerReport]:
    """The quantized layers as `plan` reported them (shape, scheme, own class), under the names
    the export stores them by."""
    return [LayerReport(checkpoint_module(model.config, name), m.in_features, m.out_features,
                        m.weight_spec, None, source_class(m), per_expert_checkpoint(model, name),
                        vllm_reads_experts(model, name))
            for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def write_weights(tensors: dict[str, torch.Tensor], directory: Path,
                  max_shard_bytes: int | None) -> list[str]:
    """The weights files (one, or shards of at most max_shard_bytes with their index), in the
    order of `tensors`, a module's tensors (packed codes, scales, shape) always in one file so
    each shard decompresses on its own; returns the file names."""
    modules: dict[str, list[str]] = {}
    for key in tensors:
        modules.setdefault(key.rpartition(".")[0], []).append(key)
    sizes = [(m, sum(tensors[k].numel() * tensors[k].element_size() for k in keys))
             for m, keys in modules.items()]
    plan = plan_shards(sizes, max_shard_bytes) if max_shard_bytes else [list(modules)]
    shards = [[k for m in group for k in modules[m]] for group in plan]
    names = [shard_name(i, len(shards)) for i in range(len(shards))]
    for name, keys in zip(names, shards):
        save_file({k: tensors[k] for k in keys}, str(directory / name), metadata={"format": "pt"})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                 "weight_map": {k: name for name, keys in zip(names, shards) for k in keys}}
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return names


def verify_export(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    """Re-open what was written and compare every tensor, file by file, so a bad write never
    gets renamed."""
    found: set[str] = set()
    for path in weight_files(directory):
        for key, tensor in iter_tensors(path):  # one tensor in memory at a time
            if key not in expected:
                raise OSError(f"{path}: tensor {key!r} was not meant to be written")
            if tensor.dtype != expected[key].dtype or not torch.equal(tensor, expected[key].cpu()):
                raise OSError(f"{path}: tensor {key!r} differs after write")
            found.add(key)
    missing = sorted(set(expected) - found)
    if missing:
        raise OSError(f"{directory}: tensors missing after write: {missing[:5]}")
