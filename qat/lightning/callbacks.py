"""The Lightning callbacks of the end-to-end stage: pruning on schedule, and weight SQNR after
each validation.

Pruning, order within a training step (automatic optimization):
  on_train_batch_start  -> masks are (re)computed when the schedule says so, and applied
  forward / backward / optimizer.step  -> AdamW moves pruned weights a little (momentum, decay)
  on_train_batch_end    -> masks are applied again, so between steps pruned weights are exactly 0
Because FakeQuantLinear shares the weight Parameter and 0 lies on every integer grid (it quantizes to
the zero point), the fake-quantized weights are zero there too.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from torch import nn

from qat.eval.sqnr import sqnr_table
from qat.io import write_json
from qat.prune.masks import apply_masks, mask_sparsity
from qat.prune.pruner import calibration_norms, compute_masks
from qat.prune.schedule import last_update_at, sparsity_at
from qat.prune.spec import PruneSpec


def _target(pl_module: L.LightningModule) -> nn.Module:
    """The wrapped Hugging Face model when there is one, so layer names read like `qat.quant`'s
    ("model.layers.0.mlp.up_proj") and the include/exclude patterns mean the same in both."""
    inner = getattr(pl_module, "model", None)
    return inner if isinstance(inner, nn.Module) else pl_module


class PruningCallback(L.Callback):
    """Prune the LightningModule's Linears by `spec`, on its schedule, and hold the masks.

    Args:
        spec: the pruning spec (method, pattern, sparsity, schedule, include/exclude).
        calibration: token-id batches (a (N, T) tensor or an iterable of (B, T) tensors) for
            method=wanda; norms are collected once, at the first update, and checkpointed.
        input_norms: precomputed {linear name: (in,)} norms instead of `calibration`.
    """

    def __init__(self, spec: PruneSpec, calibration: Any = None,
                 input_norms: Mapping[str, torch.Tensor] | None = None) -> None:
        if spec.method == "wanda" and calibration is None and input_norms is None:
            raise ValueError("prune.method='wanda' needs calibration data or input_norms")
        self.spec = spec
        self.calibration = calibration
        self.input_norms = dict(input_norms) if input_norms is not None else None
        self.masks: dict[str, torch.Tensor] = {}
        self.last_update: int | None = None  # schedule position: step of the latest mask update
        self.updates: list[int] = []  # steps at which this instance computed masks (for logs)
        self.sparsity = 0.0  # fraction of the targeted weights masked out, logged every step

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Recompute masks if the schedule has an update due at `step`; apply them. True if it did."""
        due = last_update_at(step, self.spec)
        if due is None or (self.last_update is not None and due <= self.last_update):
            return False
        if self.spec.method == "wanda" and self.input_norms is None:
            self.input_norms = calibration_norms(model, self.spec, self.calibration)
        self.masks = compute_masks(model, self.spec, sparsity_at(step, self.spec),
                                   self.input_norms, previous=self.masks or None)
        self.last_update = due
        self.updates.append(step)
        self.sparsity = mask_sparsity(self.masks)
        apply_masks(model, self.masks)
        return True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.masks:  # resumed: masks come back on the CPU; move them once, not every step
            modules = dict(_target(pl_module).named_modules())
            self.masks = {n: m.to(modules[n].weight.device) for n, m in self.masks.items()}
            apply_masks(_target(pl_module), self.masks)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.spec.enabled:
            self.update(_target(pl_module), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        if not self.masks:
            return
        apply_masks(_target(pl_module), self.masks)
        pl_module.log("prune/sparsity", self.sparsity, on_step=True, batch_size=1)


    def state_dict(self) -> dict[str, Any]:
        """Masks, schedule position and Wanda norms: plain tensors and ints, so the checkpoint
        still loads with torch.load(weights_only=True)."""
        return {"masks": {n: m.cpu() for n, m in self.masks.items()},
                "last_update": self.last_update,
                "input_norms": {n: v.cpu() for n, v in (self.input_norms or {}).items()} or None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.masks = {n: m.bool() for n, m in state_dict["masks"].items()}
        self.last_update = state_dict["last_update"]
        self.sparsity = mask_sparsity(self.masks)
        if state_dict.get("input_norms") is not None:
            self.input_norms = dict(state_dict["input_norms"])


def start_pruning(model: nn.Module, spec: PruneSpec, calibration=None) -> PruningCallback:
    """The schedule's callback, with what is due at step 0 pruned now, on the float model (so
    every eval and a 0-step run see it)."""
    callback = PruningCallback(spec, calibration=calibration)
    if last_update_at(0, spec) is not None:
        callback.update(model, 0)
    return callback


class SQNRCallback(L.Callback):
    """After each validation: weight SQNR of every FakeQuantLinear, logged and written to JSON.

    Logged as `sqnr/<layer>` (dB) through every attached logger's `log_metrics`, so CSV, wandb or
    none all work, plus `sqnr/min` (the worst layer; exact layers, null in the table, are not logged); `<out_dir>/sqnr.json` holds the latest table,
    worst layer first, with the step it was measured at. Weight SQNR needs no data and costs one
    fake-quantization per layer, so it is cheap enough for every validation.

    Args:
        out_dir: where sqnr.json goes (usually the run directory); None: do not write it.
    """

    def __init__(self, out_dir: str | Path | None = None) -> None:
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.last_table: list[dict] = []

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # sharded (trainer=fsdp2), every rank takes part in gathering each unit's weights in
        # turn; otherwise rank zero alone measures. Rank zero reports.
        sharded = getattr(trainer.strategy, "shard", None) is not None
        if trainer.sanity_checking or not (trainer.is_global_zero or sharded):
            return
        model = getattr(pl_module, "model", pl_module)  # QATModule keeps the HF model in .model
        table = sqnr_table(model)
        if not table or not trainer.is_global_zero:
            return
        self.last_table = table
        # an exact layer (null dB) is left out: loggers and dashboards choke on infinity
        metrics = {f"sqnr/{row['layer']}": row["weight_sqnr_db"] for row in table
                   if row["weight_sqnr_db"] is not None}
        if metrics:
            metrics["sqnr/min"] = min(metrics.values())
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if self.out_dir is not None:
            write_json(self.out_dir / "sqnr.json", {"step": trainer.global_step, "layers": table})

