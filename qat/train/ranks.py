"""The stages before training run once: rank 0 runs them, the other ranks take its result.

Under DDP every process runs `train(cfg)` from the start: Lightning's launcher starts ranks 1..N
when rank 0 reaches `fit`, torchrun and SLURM start every rank at once. Rank 0 alone measures the
float perplexity, calibrates (PTQ) and trains the blocks, then writes the model's state as the
end-to-end stage starts from it to `<run dir>/prepared/` with the launch it belongs to; the other
ranks skip those stages, wait for that file (several machines: the run directory must be on a
file system they share) and load it. Pruning masks and the layer plan are deterministic and cheap
beside calibration: every rank makes its own.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path

import torch
from omegaconf import DictConfig

from qat.io import atomic_path, is_rank_zero, write_json

PREPARED = "prepared"
LAUNCH = "QAT_LAUNCH_ID"  # set by rank 0 for the processes Lightning's launcher starts from it


def world_size(cfg: DictConfig) -> int:
    """Processes the trainer config asks for: devices (a count, a list of indices, or auto / -1:
    every visible GPU) times nodes."""
    trainer = cfg.trainer
    devices = trainer.get("devices", 1)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if isinstance(devices, str) or devices == -1:  # auto
        count = torch.cuda.device_count() if trainer.get("accelerator", "auto") in (
            "gpu", "cuda", "auto") else 1
    else:
        count = devices if isinstance(devices, int) else len(devices)
    return max(count, 1) * int(trainer.get("num_nodes", 1) or 1)


def distributed(cfg: DictConfig) -> bool:
    return world_size(cfg) > 1


def follows(cfg: DictConfig) -> bool:
    """Whether this process takes rank 0's prepared model instead of running the stages."""
    return distributed(cfg) and not is_rank_zero()


def launch_id() -> str | None:
    """What the processes of one launch share: rank 0's id handed to the ranks it starts, or
    torchrun's / SLURM's own."""
    for key in (LAUNCH, "TORCHELASTIC_RUN_ID"):
        if os.environ.get(key):
            return os.environ[key]
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}-{os.environ.get('SLURM_STEP_ID', '0')}"
    return None


def begin(cfg: DictConfig, run_dir: Path) -> None:
    """At the start of a distributed run, on rank 0: the launch id its ranks will look for
    (made here when no launcher gave one) and no prepared state of an earlier launch."""
    if not distributed(cfg) or not is_rank_zero():
        return
    if launch_id() is None:
        os.environ[LAUNCH] = uuid.uuid4().hex
    for name in ("state.pt", "done.json"):
        (run_dir / PREPARED / name).unlink(missing_ok=True)


def share(model: torch.nn.Module, run_dir: Path) -> None:
    """Rank 0: the model's state as training starts from it, for the other ranks."""
    directory = run_dir / PREPARED
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_path(directory / "state.pt") as tmp:
        torch.save(model.state_dict(), tmp)
    write_json(directory / "done.json", {"launch": launch_id()})


def take(model: torch.nn.Module, run_dir: Path, wait_minutes: float) -> None:
    """Another rank: wait (at most `wait_minutes`) for rank 0's prepared state of this launch,
    then load it into `model` (prepared for quantization as rank 0's was).

    Raises TimeoutError saying what it waited for."""
    done, state = run_dir / PREPARED / "done.json", run_dir / PREPARED / "state.pt"
    launch = launch_id()
    deadline = time.monotonic() + wait_minutes * 60
    while True:
        if done.is_file():
            try:
                ready = launch is None or json.loads(done.read_text()).get("launch") == launch
            except ValueError:  # being written
                ready = False
            if ready:
                break
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank {os.environ.get('RANK', os.environ.get('LOCAL_RANK'))}: "
                               f"waited {wait_minutes:g} min for rank 0's calibrated model "
                               f"({done}, launch {launch}); raise launch.stage_wait_minutes "
                               "for a longer calibration, or check rank 0's log")
        time.sleep(1.0)
    # mapped, not read: the file's pages are copied into the model's tensors, never held twice
    model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True, mmap=True))
