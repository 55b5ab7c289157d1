"""Checkpoints that are never half-written, safe to load, and resumable by name.

Every checkpoint (Lightning's periodic ones and train.py's final one) goes through
`AtomicCheckpointIO`: written under a temporary name, renamed when complete, so a crash or SIGKILL
at any point leaves the previous checkpoint intact. Loading always uses
`torch.load(weights_only=True)`: a checkpoint is data, never code. FSDP2's distributed checkpoints
(a directory of shards) are made atomic by `qat.lightning.strategies.save_sharded`.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from lightning.pytorch.plugins.io import TorchCheckpointIO

from qat.io import atomic_path, first_difference
from qat.models.checkpoint import is_distributed, read_checkpoint

CHECKPOINT_DIR = "checkpoints"
_STEP = re.compile(r"step=(\d+)")


class AtomicCheckpointIO(TorchCheckpointIO):
    """TorchCheckpointIO that writes to a temporary sibling and renames, and loads weights only."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("storage_options are not supported by AtomicCheckpointIO")
        with atomic_path(path) as tmp:
            write_checkpoint(checkpoint, tmp)

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None):
        return super().load_checkpoint(path, map_location=map_location or "cpu", weights_only=True)


def write_checkpoint(checkpoint: dict[str, Any], path: Path) -> None:
    """torch.save straight into the file. Lightning's own writer serializes the whole checkpoint
    into memory first (weights and optimizer moments: 12 bytes per trained float32 parameter
    with AdamW), the largest peak of a run (bench/memory.py); atomic_path gives the atomicity."""
    import torch

    torch.save(checkpoint, path)



def resolve_ckpt_path(value: str | None, run_dir: Path) -> Path | None:
    """`ckpt_path=last` -> <run_dir>/checkpoints/last.ckpt; a path is taken as it is.

    Raises FileNotFoundError naming `ckpt_path` when the file is not there.
    """
    if value in (None, ""):
        return None
    path = run_dir / CHECKPOINT_DIR / "last.ckpt" if str(value) == "last" else Path(value)
    if not (path.is_file() or is_distributed(path)):
        hint = " (give the run's directory with hydra.run.dir=DIR)" if str(value) == "last" else ""
        raise FileNotFoundError(f"ckpt_path={value}: no checkpoint at {path}{hint}")
    remove_stale_temporaries(path.parent)
    return path


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete `.NAME.*.tmp` leftovers of writes a killed process never finished.

    A SIGKILL during a checkpoint write leaves its temporary behind (the final name is never
    touched, so the previous checkpoint stays good); the resumed run clears them away.
    """
    import shutil

    stale = sorted(Path(directory).glob(".*.tmp"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def check_resume_config(path: Path, run_config: dict[str, Any]) -> None:
    """Read the checkpoint (weights only) and check this run builds the same model from it.

    Raises ValueError naming `ckpt_path` and the first differing field of model/quant/prune.
    """
    try:
        ckpt = read_checkpoint(path, tensors=False)
    except ValueError as err:
        raise ValueError(str(err).replace("--ckpt ", "ckpt_path=", 1)) from err
    saved = ckpt.get("qat", {}).get("config", {})
    for section in ("model", "quant", "prune"):
        diff = first_difference(saved.get(section), run_config.get(section), section)
        if diff is not None:
            key, was, now = diff
            raise ValueError(f"ckpt_path={path}: {key}={now!r} differs from the checkpoint's "
                             f"{key}={was!r}; resume with the run's own config")
    if "loops" not in ckpt:
        raise ValueError(f"ckpt_path={path}: written by a run with trainer.max_steps=0 (weights "
                         "only): there is no training state to resume")


def last_good_checkpoint(run_dir: Path) -> tuple[Path, int] | None:
    """The checkpoint of the latest step under <run_dir>/checkpoints (None if there is none)."""
    best = None
    for path in (run_dir / CHECKPOINT_DIR).glob("*.ckpt"):
        found = _STEP.search(path.name)
        step = int(found.group(1)) if found else -1
        if best is None or step > best[1]:
            best = (path, step)
    if best is not None and best[1] < 0:  # only last.ckpt: read its step
        best = (best[0], int(read_checkpoint(best[0], tensors=False).get("global_step", 0)))
    return best
