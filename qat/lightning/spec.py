"""The end-to-end stage's own groups of train.yaml besides `optim` and `trainer`: periodic
checkpoints, what a NaN loss does, and how several processes start."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointSpec:
    every_n_steps: int = 0  # 0: only the final checkpoint; N: also every N optimizer steps

    def __post_init__(self) -> None:
        if not isinstance(self.every_n_steps, int) or isinstance(self.every_n_steps, bool) \
                or self.every_n_steps < 0:
            raise ValueError(f"checkpoint.every_n_steps={self.every_n_steps!r} must be an "
                             "integer >= 0")


@dataclass(frozen=True)
class GuardSpec:
    """A NaN/inf loss stops the run, naming the step and the last good checkpoint."""

    skip_nonfinite: bool = False  # true: skip that update instead (8 in a row still stop it)

    def __post_init__(self) -> None:
        if not isinstance(self.skip_nonfinite, bool):
            raise ValueError(f"guard.skip_nonfinite={self.skip_nonfinite!r} must be true or false")


@dataclass(frozen=True)
class LaunchSpec:
    """Several processes (trainer=ddp): rank 0 alone runs the stages before training (float
    perplexity, PTQ, the block stage); the other ranks wait for its calibrated model."""

    stage_wait_minutes: float = 1440.0  # then they stop with an error naming this field

    def __post_init__(self) -> None:
        value = self.stage_wait_minutes
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"launch.stage_wait_minutes={value!r} must be a number of minutes "
                             "> 0")
