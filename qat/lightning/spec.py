"""The end-to-end stage's own groups of train.yaml besides `optim` and `trainer`: periodic
checkpoints and what a NaN loss does."""
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
