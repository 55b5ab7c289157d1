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
from qat.format.schema import WEIGHTS_FILE, quantization_config
from qat.io import atomic_path
from qat.kernels import QuantizedLinear
from qat.quant.modules import FakeQuantLinear
from qat.models.structure import source_class
from qat.quant.swap import LayerReport


def export_model(model: nn.Module, tokenizer, out_dir: str | Path,
                 dtype: torch.dtype = torch.bfloat16, run: dict[str, Any] | None = None) -> Path:
    """Write `model` and `tokenizer` to `out_dir`: a fake-quantized model (FakeQuantLinear layers,
    converted here) or one that `qat.export.convert` already converted (QuantizedLinear layers).

    Quantized Linears are stored packed with their scales (and zero points); every other tensor in
    `dtype`. `run`: what the model card says about how it was made (base_model, recipe, command,
    fp_ppl, ppl, eval). Returns the directory.
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
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _portable_tokenizer_config(tmp / "tokenizer_config.json")
        layers = _layers(model)
        report = serving_report(layers)
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
    """The quantized layers as `plan` reported them (name, shape, scheme, own class)."""
    return [LayerReport(name, m.in_features, m.out_features, m.weight_spec, None, source_class(m))
            for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


def verify_export(directory: Path, expected: dict[str, torch.Tensor]) -> None:
    """Re-open what was written and compare every tensor, so a bad write never gets renamed."""
    from safetensors import safe_open

    path = directory / WEIGHTS_FILE
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise OSError(f"{path}: tensors missing after write: {missing[:5]}")
        for key, value in expected.items():
            if not torch.equal(f.get_tensor(key), value.cpu()):
                raise OSError(f"{path}: tensor {key!r} differs after write")
