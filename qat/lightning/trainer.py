"""The Trainer of the end-to-end stage: built from the trainer/logger config, fitted with a clear
error on divergence, asked for perplexities, and its final checkpoint written atomically."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig

from qat.lightning.checkpointing import AtomicCheckpointIO, last_good_checkpoint
from qat.lightning.data import TextDataModule
from qat.lightning.module import DivergenceError, QATModule
from qat.lightning.spec import CheckpointSpec
from qat.models.placement import native_bf16, stage_device
from qat.quant import set_fake_quant_enabled


class _NoAdverts(logging.Filter):
    """Drops Lightning's "Tip: try installing litlogger" line: an advert, not run information."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in str(record.msg)


def _quiet_lightning() -> None:
    import warnings

    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoAdverts) for f in log.filters):
        log.addFilter(_NoAdverts())
    # Lightning 2.6's own use of a torch API that torch 2.13 deprecates: nothing a user can act on
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)",
                            module="lightning")


def build_trainer(cfg: DictConfig, checkpoint: CheckpointSpec, run_dir: Path,
                  callbacks: list | None = None) -> L.Trainer:
    """The Lightning Trainer of `cfg.trainer` and `cfg.logger`, with atomic checkpoint writes and
    our data order."""
    _quiet_lightning()
    logger = False
    if cfg.get("logger") and cfg.logger.get("_target_"):
        logger = instantiate(cfg.logger, save_dir=str(run_dir))
    callbacks = list(callbacks or [])
    if cfg.trainer.get("enable_progress_bar", True):
        from qat.lightning.progress import StepProgressBar

        callbacks.append(StepProgressBar())
    every = checkpoint.every_n_steps
    if every:
        from lightning.pytorch.callbacks import ModelCheckpoint
        callbacks.append(ModelCheckpoint(dirpath=run_dir / "checkpoints", every_n_train_steps=every,
                                         save_last=True, save_top_k=-1))
    # the DataModule shards each global batch itself (same order for 1 or N processes)
    return instantiate(cfg.trainer, precision=trainer_precision(cfg.trainer), logger=logger,
                       callbacks=callbacks,
                       default_root_dir=str(run_dir), enable_checkpointing=bool(every),
                       plugins=[AtomicCheckpointIO()], use_distributed_sampler=False)


def trainer_precision(trainer_cfg: DictConfig) -> str:
    """trainer.precision as Lightning takes it; `auto`: bf16-mixed where the trainer's device
    computes bf16 natively, 32-true elsewhere (where bf16 would be emulated, and slower)."""
    precision = str(trainer_cfg.get("precision", "32-true"))
    if precision != "auto":
        return precision
    device = stage_device("auto", trainer_cfg.get("accelerator", "auto"), "trainer.accelerator")
    return "bf16-mixed" if native_bf16(device) else "32-true"


def fit(trainer: L.Trainer, module: QATModule, data: TextDataModule, ckpt_path: Path | None,
        run_dir: Path) -> None:
    """trainer.fit, resuming from `ckpt_path`; a diverged loss names the last good checkpoint."""
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)
    except DivergenceError as err:
        good = last_good_checkpoint(run_dir)
        where = (f"the last good checkpoint is {good[0]} (step {good[1]}): resume with "
                 f"ckpt_path={good[0]} and a smaller optim.lr, or skip such steps with "
                 f"guard.skip_nonfinite=true" if good else
                 "no checkpoint was written yet (set checkpoint.every_n_steps=N to keep some)")
        raise DivergenceError(f"{err}; the run stopped. {where}") from err


def validate_ppl(trainer: L.Trainer, module: QATModule, data: TextDataModule, prefix: str,
                 quantized: bool) -> float:
    """Protocol perplexity of the model as it is now (fake quantization on or off)."""
    set_fake_quant_enabled(module.model, quantized)
    module.val_prefix = prefix
    trainer.validate(module, datamodule=data, verbose=False)
    module.val_prefix = "val"
    return float(trainer.callback_metrics[f"{prefix}/ppl"])


def save_checkpoint(trainer: L.Trainer, module: QATModule, path: Path) -> None:
    """The final checkpoint; every rank calls it (FSDP gathers), rank zero writes, atomically."""
    if trainer.global_step > 0:
        trainer.save_checkpoint(path, weights_only=False)
    elif trainer.is_global_zero:  # nothing was fitted: weights and config are all there is to keep
        AtomicCheckpointIO().save_checkpoint({"state_dict": module.state_dict(), "global_step": 0,
                                              "qat": {"config": module.run_config}}, path)


def is_sharded(trainer: L.Trainer) -> bool:
    """True when parameters are split across ranks (FSDP): export from the gathered checkpoint."""
    name = type(trainer.strategy).__name__.lower()
    return "fsdp" in name or "modelparallel" in name
