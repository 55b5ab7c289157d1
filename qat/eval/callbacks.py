"""Lightning callbacks that watch quantization error during training."""
from __future__ import annotations

from pathlib import Path

import lightning as L

from qat.eval.sqnr import sqnr_table
from qat.io import write_json


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
        if trainer.sanity_checking or not trainer.is_global_zero:
            return
        model = getattr(pl_module, "model", pl_module)  # QATModule keeps the HF model in .model
        table = sqnr_table(model)
        if not table:
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

