"""The stages before training run once: rank 0 runs them, the other ranks take its result.

Under DDP every process runs `train(cfg)` from the start: Lightning's launcher starts ranks 1..N
when rank 0 reaches `fit`, torchrun and SLURM start every rank at once. Rank 0 alone measures the
float perplexity, calibrates (PTQ) and trains the blocks, then writes the model's state as the
end-to-end stage starts from it to `<run dir>/prepared/` with the launch it belongs to; the other
ranks skip those stages, wait for that file (several machines: the run directory must be on a
file system they share) and load it. Under FSDP2 (`lean`) rank 0 writes only the word that it is
ready: the other ranks built the model on the meta device and receive their own shards from
rank 0 when the model is sharded. Pruning masks and the layer plan are deterministic and cheap
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


def sharded(cfg: DictConfig) -> bool:
    """Whether the trainer shards the model across ranks (trainer=fsdp2)."""
    strategy = cfg.trainer.get("strategy")
    target = strategy.get("_target_", "") if hasattr(strategy, "get") else str(strategy or "")
    return distributed(cfg) and str(target).endswith("strategies.fsdp2")


def lean(cfg: DictConfig, specs) -> bool:
    """Whether the ranks other than 0 (and every rank of a resumed run) build the model on the
    meta device and hold only their own shards of it, filled once the model is sharded
    (`qat.lightning.strategies.fill_shards`): under FSDP2, when nothing a rank runs before
    training reads the weights (pruning masks, outlier and bit-budget calibration,
    teacher-written data and a teacher copied from a model without files do). The same answer
    on every rank."""
    from qat.models.load import model_dir

    copied_teacher = specs.distill.enabled and specs.distill.teacher.is_self \
        and model_dir(specs.model) is None
    return sharded(cfg) and specs.quant.weight is not None \
        and not specs.prune.enabled and specs.ptq.outliers == "off" \
        and specs.quant.budget_bits is None and not specs.data.generated_samples \
        and not copied_teacher


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


def share(model: torch.nn.Module, run_dir: Path, state: bool = True) -> None:
    """Rank 0: the model's state as training starts from it (its trainable part chosen: codes
    held when the scales alone train), for the other ranks; `state` False: only the word that
    it is ready (lean ranks receive their shards from rank 0 when the model is sharded)."""
    directory = run_dir / PREPARED
    directory.mkdir(parents=True, exist_ok=True)
    if state:
        with atomic_path(directory / "state.pt") as tmp:
            torch.save(model.state_dict(), tmp)
    write_json(directory / "done.json", {"launch": launch_id()})


def take(model: torch.nn.Module, run_dir: Path, wait_minutes: float) -> None:
    """Another rank: wait for rank 0's prepared state (`wait`), then load it into `model`
    (prepared for quantization as rank 0's was; built on the meta device: its tensors are
    assigned, not copied)."""
    # mapped, not read: the file's pages are copied into the model's tensors, never held twice
    path = wait(run_dir, wait_minutes)
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    meta = any(t.is_meta for t in model.parameters())
    model.load_state_dict(state, assign=meta)
    if meta:  # tied parameters were assigned one tensor each: tie them again
        model.tie_weights()


def wait(run_dir: Path, wait_minutes: float) -> Path:
    """Another rank: wait (at most `wait_minutes`) for rank 0's prepared state of this launch;
    returns its file.

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
    return state
