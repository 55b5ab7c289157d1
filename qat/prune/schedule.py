"""Sparsity schedules as pure functions of the optimizer step (nanoGPT style).

`step` is Lightning's `global_step` at the start of a batch: the number of optimizer steps already
taken. Masks are (re)computed at update steps only; between them the sparsity holds, which is why
`sparsity_at` is defined through `last_update_at`: it is the sparsity the model actually has.
"""
from __future__ import annotations

from qat.prune.spec import PruneSpec


def gradual_sparsity(step: int, initial: float, final: float, start: int, end: int) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t_end - t0))^3.

    `step` is clamped to [start, end], so the value is s_i before t0 and s_f after t_end; the cubic
    prunes fast early, while many redundant weights remain, and slowly near the end.
    """
    t = min(max(step, start), end)
    progress = (t - start) / (end - start)
    return final + (initial - final) * (1.0 - progress) ** 3


def last_update_at(step: int, spec: PruneSpec) -> int | None:
    """The latest step <= `step` at which masks are computed, or None before pruning starts.

    gradual: t0, t0 + k, t0 + 2k, ... and t_end itself (so s_f is reached even when k does not
    divide t_end - t0). oneshot: start_step. constant: 0.
    """
    if not spec.enabled:
        return None
    if spec.schedule == "constant":
        return 0 if step >= 0 else None
    if step < spec.start_step:
        return None
    if spec.schedule == "oneshot":
        return spec.start_step
    if step >= spec.end_step:
        return spec.end_step
    k = spec.every_n_steps
    return spec.start_step + (step - spec.start_step) // k * k


def sparsity_at(step: int, spec: PruneSpec) -> float:
    """Target sparsity held during `step`: 0 before pruning starts, then stepwise as masks update."""
    update = last_update_at(step, spec)
    if update is None:
        return 0.0
    if spec.schedule != "gradual":
        return spec.final_sparsity
    return gradual_sparsity(update, spec.initial_sparsity, spec.sparsity, spec.start_step,
                            spec.end_step)
