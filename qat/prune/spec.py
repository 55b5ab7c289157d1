"""The pruning spec: a frozen dataclass that Hydra fills and that validates itself.

Every knob of a pruning run lives here, so the callback, the schedule and the report all read the same
values and a bad value fails at config time, naming the field, rather than at step 5000.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

METHODS = ("none", "magnitude", "wanda")
STRUCTURED = ("heads", "channels")
SCOPES = ("layer", "row", "global")
SCHEDULES = ("oneshot", "constant", "gradual")
_NM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"prune.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"prune.{name}={value!r} is not allowed; it must be a number in [0, 1)")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"prune.{name}={value!r} is not allowed; it must be an integer >= {low}")


def parse_nm(pattern: str) -> tuple[int, int] | None:
    """(N, M) for an 'N:M' pattern string, None for any other pattern."""
    found = _NM.match(pattern) if isinstance(pattern, str) else None
    return (int(found.group(1)), int(found.group(2))) if found else None


@dataclass(frozen=True)
class PruneSpec:
    """What to prune, by which score, how much, and when.

    `sparsity` is the final fraction of weights removed (unstructured), or of KV groups (heads) or MLP
    channels (channels) removed from every layer; N:M patterns imply their own sparsity (M-N)/M.
    """

    method: str = "none"  # none | magnitude (|W|) | wanda (|W| * ||X_j||_2 from calibration data)
    pattern: str = "unstructured"  # unstructured | N:M such as "2:4" | heads | channels
    sparsity: float = 0.5  # final fraction removed; ignored by N:M patterns
    scope: str = "layer"  # unstructured only: layer | row (Wanda's per-output group) | global
    schedule: str = "oneshot"  # oneshot (at start_step) | constant (from step 0) | gradual (cubic)
    start_step: int = 0  # oneshot: the step masks are computed; gradual: t0
    end_step: int = 0  # gradual: t_end, where `sparsity` is reached
    every_n_steps: int = 1  # gradual: masks are recomputed every k steps between t0 and t_end
    initial_sparsity: float = 0.0  # gradual: s_i at t0
    # fnmatch patterns on Linear module names; None: every projection inside the decoder blocks
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ("*lm_head", "*embed*")  # the tied head and embeddings stay dense
    calibration_samples: int = 128  # wanda: sequences whose activations give ||X_j||_2

    def __post_init__(self) -> None:
        _check_choice("method", self.method, METHODS)
        self._check_pattern()
        _check_fraction("sparsity", self.sparsity)
        _check_fraction("initial_sparsity", self.initial_sparsity)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("schedule", self.schedule, SCHEDULES)
        for name, low in (("start_step", 0), ("end_step", 0), ("every_n_steps", 1),
                          ("calibration_samples", 1)):
            _check_int(name, getattr(self, name), low)
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None and name == "include":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"prune.{name} must be a list of name patterns, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.include is not None and not self.include:
            raise ValueError("prune.include is empty; give at least one module-name pattern, or "
                             "null for every projection inside the decoder blocks")
        self._check_combinations()

    def _check_pattern(self) -> None:
        if self.pattern in ("unstructured",) + STRUCTURED:
            return
        nm = parse_nm(self.pattern)
        if nm is None:
            raise ValueError(f"prune.pattern={self.pattern!r} is not allowed; choose one of "
                             f"['unstructured', 'heads', 'channels'] or N:M such as '2:4'")
        n, m = nm
        if not 0 < n < m:
            raise ValueError(f"prune.pattern={self.pattern!r} is not allowed; N:M needs 0 < N < M")

    def _check_combinations(self) -> None:
        if self.scope != "layer" and self.pattern != "unstructured":
            raise ValueError(f"prune.scope={self.scope!r} is not allowed with "
                             f"prune.pattern={self.pattern!r}; only unstructured pruning takes "
                             "row or global scope, choose scope=layer")
        if self.nm is not None and self.schedule == "gradual":
            raise ValueError(f"prune.schedule='gradual' is not allowed with prune.pattern="
                             f"{self.pattern!r}; N:M is applied at once: choose oneshot or constant")
        if self.schedule == "constant" and self.start_step != 0:
            raise ValueError(f"prune.start_step={self.start_step} is not allowed with "
                             "prune.schedule='constant' (pruned from step 0); use schedule=oneshot "
                             "to prune later")
        if self.schedule == "gradual":
            if self.end_step <= self.start_step:
                raise ValueError(f"prune.end_step={self.end_step} is not allowed; gradual pruning "
                                 f"needs end_step > start_step={self.start_step}")
            if self.initial_sparsity > self.sparsity:
                raise ValueError(f"prune.initial_sparsity={self.initial_sparsity} is not allowed; "
                                 f"it must be <= prune.sparsity={self.sparsity}")

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) when the pattern is N:M, else None."""
        return parse_nm(self.pattern)

    @property
    def final_sparsity(self) -> float:
        """The fraction removed once the schedule is done: (M-N)/M for N:M, else `sparsity`."""
        nm = self.nm
        return (nm[1] - nm[0]) / nm[1] if nm else float(self.sparsity)
