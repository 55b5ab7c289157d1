"""The training bar counts optimizer steps of `trainer.max_steps`.

Our runs stop on steps (`max_epochs=-1`), so Lightning's own bars read `Epoch 0/-2` and count batches
of an epoch that never ends; this one reads `train 7/10` with the loss, and the final evaluation
reads `ppl`.
"""
from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import TQDMProgressBar


class StepProgressBar(TQDMProgressBar):
    @property
    def train_description(self) -> str:
        return "train"

    @property
    def validation_description(self) -> str:
        return "ppl"

    def on_train_epoch_start(self, trainer, *_: Any) -> None:
        if self._leave or self.train_progress_bar is None:
            self.train_progress_bar = self.init_train_tqdm()
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps if trainer.max_steps > 0 else None)
        bar.initial = bar.n = trainer.global_step  # a resumed run starts where it stopped
        bar.set_description(self.train_description)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        bar = self.train_progress_bar
        if bar is not None and trainer.global_step != bar.n:
            bar.n = trainer.global_step
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()
