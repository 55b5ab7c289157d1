"""Rebuild the fake-quantized model from a run checkpoint alone (the run config lives inside it).

Below the trainer: the export and eval commands read runs without importing Lightning.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint written by train.py, loaded without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupted, or not a torch file
        raise ValueError(f"--ckpt {path}: cannot be read as a checkpoint ({err})") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "qat" not in ckpt:
        raise ValueError(f"--ckpt {path}: not a qat run checkpoint (no state_dict / qat config)")
    return ckpt


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(fake-quantized model with the trained weights, tokenizer, run config)."""
    from hydra.utils import instantiate

    from qat.models import load_model
    from qat.models.experts import unfuse

    ckpt = read_checkpoint(path)
    config = ckpt["qat"]["config"]
    model, tokenizer = load_model(instantiate(config["model"]))
    if config.get("model_shrink"):  # structured pruning cut heads / channels: rebuild smaller
        from transformers import AutoModelForCausalLM

        for key, value in config["model_shrink"].items():
            setattr(model.config, key, value)
        model = AutoModelForCausalLM.from_config(model.config).to(model.dtype)
        unfuse(model)  # as load_model gives it: MoE experts as Linears
    if instantiate(config["prune"]).enabled:  # pruning made every Conv1D a Linear (start_pruning)
        from qat.models.structure import linearize

        linearize(model)
    quant = instantiate(config["quant"])  # qat.quant.QuantConfig, as the run's config names it
    if quant.weight is not None:
        quant.prepare(model)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embedding
    if missing or unexpected:
        raise ValueError(f"--ckpt {path}: weights do not match the model built from its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model.eval(), tokenizer, config
