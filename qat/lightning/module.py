"""The LightningModule around any causal LM, with fake quantization already swapped in."""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from qat.eval.perplexity import window_nll
from qat.lightning.schedule import lr_multiplier
from qat.quant import fake_quant_modules, set_fake_quant_enabled
from qat.quant.swap import TRAINABLE


@dataclass(frozen=True)
class OptimSpec:
    """AdamW with its own parameter group for quantizer scales, warmup then cosine decay."""

    lr: float = 2e-5  # weights: a small step keeps the pretrained function while the grid settles
    scale_lr: float = 1e-3  # learned (LSQ) scales move on their own, much larger, scale
    weight_decay: float = 0.0  # decay pulls weights off the grid they were trained for
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 3
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of the peak lr
    trainable: str = "weights"  # weights (on the fixed grid) | scales (codes frozen) | all

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE:
            raise ValueError(f"optim.trainable={self.trainable!r} is not allowed; choose one of "
                             f"{list(TRAINABLE)}")
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"optim.{name}={value!r} must be a positive finite number")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps={self.warmup_steps!r} must be >= 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        object.__setattr__(self, "betas", tuple(self.betas))


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite; the message names the step."""


MAX_CONSECUTIVE_SKIPS = 8  # guard.skip_nonfinite: a run that skips this many in a row has diverged


class QATModule(L.LightningModule):
    """Causal-LM training of a (fake-quantized) model.

    Args:
        model: a Hugging Face causal LM, already passed through `qat.quant.prepare` (or not, for a
            float baseline).
        optim: optimizer and schedule settings.
        quant_start_step: fake quantization is off before this optimizer step.
        run_config: the resolved run config, stored in every checkpoint so a checkpoint alone can
            rebuild the model (the exporter relies on it).
        distiller: when given, the loss comes from the frozen teacher (`qat.distill.Distiller`);
            it is a plain object, so the teacher stays out of checkpoints and the optimizer.
        skip_nonfinite: a NaN/inf loss skips that optimizer step (no update, counted in
            `skipped_steps`) instead of raising DivergenceError; MAX_CONSECUTIVE_SKIPS in a row
            still raise.
    """

    def __init__(self, model: nn.Module, optim: OptimSpec, quant_start_step: int = 0,
                 run_config: dict[str, Any] | None = None, distiller: Any = None,
                 skip_nonfinite: bool = False) -> None:
        super().__init__()
        self.model = model.train()  # from_pretrained returns eval mode; observers update in train
        self.distiller = distiller
        self.optim = optim
        self.quant_start_step = quant_start_step
        self.run_config = run_config or {}
        self.val_prefix = "val"
        self._val_nll = 0.0
        self._val_tokens = 0
        self.loss_history: list[float] = []  # per batch, mean over ranks; checkpointed
        self.skip_nonfinite = skip_nonfinite
        # FSDP2: the other ranks built the model on the meta device; rank 0 sends their shards
        self.fill_from_rank0 = False
        self.skipped_steps: list[int] = []  # steps whose update a non-finite loss cancelled
        self._skip_update = False
        self._consecutive_skips = 0
        set_fake_quant_enabled(self.model, quant_start_step == 0)

    def configure_model(self) -> None:
        """Under trainer=fsdp2, shard the model block by block (once: a resumed or validated
        model is sharded already); ranks that built it on meta get their shards here."""
        if hasattr(self.trainer.strategy, "shard") and not getattr(self, "_sharded", False):
            from qat.lightning.strategies import shard_model

            shard_model(self.model, self.trainer.strategy, self.fill_from_rank0)
            self._sharded = True

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        ids = batch["input_ids"]  # (B, T)
        if self.distiller is None:
            loss = self.model(input_ids=ids, labels=ids, use_cache=False).loss
        else:
            parts = self.distiller(self.model, ids, rows=batch.get("row"))
            loss = parts.pop("loss")
            for key, value in parts.items():
                self.log(f"train/{key}", value.detach(), on_step=True, batch_size=ids.shape[0])
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=ids.shape[0])
        self._guard(loss)
        return loss

    def _guard(self, loss: torch.Tensor) -> None:
        """Record the global batch's loss; stop (or skip the step) when it is not finite.

        The mean over ranks decides, so every DDP rank raises or skips at the same step."""
        value = loss.detach()
        if self._trainer is not None and self.trainer.world_size > 1:
            value = self.trainer.strategy.reduce(value, reduce_op="mean")
        value = value.item()
        self.loss_history.append(value)
        self._skip_update = not math.isfinite(value)
        if not self._skip_update:
            self._consecutive_skips = 0
            return
        step = self.global_step
        self._consecutive_skips += 1
        if self.skip_nonfinite and self._consecutive_skips < MAX_CONSECUTIVE_SKIPS:
            self.skipped_steps.append(step)
            print(f"warning: train/loss is {value} at step {step}: skipping this update "
                  f"(guard.skip_nonfinite=true)")
            return
        why = f" ({self._consecutive_skips} steps in a row)" if self.skip_nonfinite else ""
        raise DivergenceError(f"train/loss is {value} at step {step}{why}")

    def on_before_optimizer_step(self, optimizer) -> None:
        if self._skip_update:  # no gradient: AdamW leaves these parameters and moments alone
            optimizer.zero_grad(set_to_none=True)

    def on_fit_start(self) -> None:
        if self.distiller is not None:  # one replica per rank, on that rank's device
            self.distiller.to(self.device)
        if self.quant_start_step and self.global_step > self.quant_start_step:  # resumed
            set_fake_quant_enabled(self.model, True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.quant_start_step and self.global_step == self.quant_start_step:
            # Scales learned from the float warm-up weights, not the ones at step 0.
            for m in fake_quant_modules(self.model):
                m.weight_fake_quant.reset_scale(m.weight)
            set_fake_quant_enabled(self.model, True)

    def on_validation_epoch_start(self) -> None:
        self._val_nll, self._val_tokens = 0.0, 0

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        # the protocol's perplexity does not depend on trainer.precision: bf16-mixed trains
        # faster, but its autocast would also round the evaluation's matmuls
        ids = batch["input_ids"]
        with torch.autocast(ids.device.type, enabled=False):
            nll, count = window_nll(self.model, ids)
        self._val_nll += nll.item()
        self._val_tokens += count

    def on_validation_epoch_end(self) -> None:
        if not self._val_tokens:
            return
        loss = self._val_nll / self._val_tokens
        self.log(f"{self.val_prefix}/loss", loss, sync_dist=True)
        self.log(f"{self.val_prefix}/ppl", math.exp(loss), sync_dist=True)

    def configure_optimizers(self):
        scales, decay, no_decay = [], [], []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            if name.endswith(("weight_fake_quant.scale", "weight_fake_quant.zero_point")):
                scales.append(p)
            elif p.ndim >= 2 and "embed" not in name:
                decay.append(p)
            else:
                no_decay.append(p)
        groups = [{"params": decay, "lr": self.optim.lr, "weight_decay": self.optim.weight_decay},
                  {"params": no_decay, "lr": self.optim.lr, "weight_decay": 0.0}]
        if scales:
            groups.append({"params": scales, "lr": self.optim.scale_lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=self.optim.betas)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: lr_multiplier(step, self.optim.warmup_steps, total,
                                                  self.optim.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # plain tensors, ints and lists: the checkpoint loads with torch.load(weights_only=True)
        checkpoint["qat"] = {"config": self.run_config, "loss_history": list(self.loss_history),
                             "skipped_steps": list(self.skipped_steps), "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("qat", {})
        self.loss_history = list(state.get("loss_history", []))
        self.skipped_steps = list(state.get("skipped_steps", []))
        if "rng" in state:
            set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) generator states, as tensors and ints."""
    import numpy as np

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_pos": int(pos), "numpy_gauss": [int(has_gauss), float(gauss)],
             "python": [version, list(internal), gauss_next]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"],
                         *state["numpy_gauss"]))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
