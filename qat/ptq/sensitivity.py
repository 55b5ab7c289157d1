"""Per-layer sensitivity to quantization and a mixed-precision bit assignment under a budget.

Sensitivity: quantize one layer at a time with RTN at each candidate width (all else float) and
measure the damage on calibration data. Assignment: a multiple-choice knapsack, solved by dynamic
programming, that minimises the summed damage subject to the numel-weighted mean bits per weight.
Summing per-layer damage assumes the layers' errors add up, the usual first-order approximation.
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from qat.models.blocks import device_of as _device
from qat.models.blocks import fake_quant_disabled
from qat.ptq.rtn import fake_quant
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import QuantConfig, WeightSpec

SCALE_BITS = 16  # a bf16/fp16 scale per group
MAX_STATES = 200_000  # knapsack budget states; beyond it costs are rounded up (still feasible)


@torch.no_grad()
def _loss(model: nn.Module, ids: torch.Tensor, batch_size: int,
          reference: list[torch.Tensor] | None) -> float:
    """Mean per-token KL to `reference` log-probs, or next-token cross-entropy when None."""
    total, count = 0.0, 0
    for i, batch in enumerate(ids.split(batch_size)):
        batch = batch.to(_device(model))
        logp = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        if reference is None:
            total += -logp[:, :-1].gather(-1, batch[:, 1:, None]).sum().item()
            count += batch[:, 1:].numel()
        else:
            ref = reference[i].to(logp.device).float()
            total += (ref.exp() * (ref - logp)).sum().item()
            count += batch.numel()
    return total / count


@torch.no_grad()
def layer_sensitivity(model: nn.Module, ids: torch.Tensor, choices: tuple[int, ...] = (2, 3, 4, 8),
                      *, layers: dict[str, WeightSpec] | None = None, batch_size: int = 8,
                      metric: str = "kl") -> dict[str, dict[int, float]]:
    """Loss increase of quantizing each layer alone with RTN at each width in `choices`.

    Args:
        model: causal LM; by default its FakeQuantLinear layers are measured with their own spec.
        ids: (N, T) calibration token ids.
        layers: {name: spec} to measure instead (works on an unprepared model too).
        metric: "kl" (mean KL to the float model; reference log-probs of all of `ids` are kept in
            memory, so use a few short sequences) or "loss" (cross-entropy increase).
    Returns:
        {layer: {bits: loss increase}}.
    """
    if metric not in ("kl", "loss"):
        raise ValueError(f"metric={metric!r} is not allowed; choose one of ['kl', 'loss']")
    modules = dict(model.named_modules())
    if layers is None:
        layers = {n: m.weight_fake_quant.spec for n, m in modules.items()
                  if isinstance(m, FakeQuantLinear)}
    was_training = model.training
    model.eval()
    result: dict[str, dict[int, float]] = {}
    with fake_quant_disabled(model):
        reference = None
        if metric == "kl":
            reference = [torch.log_softmax(model(input_ids=b.to(_device(model)),
                                                 use_cache=False).logits.float(), -1)
                         for b in ids.split(batch_size)]
        base = 0.0 if metric == "kl" else _loss(model, ids, batch_size, None)
        for name, spec in layers.items():
            weight = modules[name].weight
            original = weight.detach().clone()
            result[name] = {}
            for bits in choices:
                weight.copy_(fake_quant(original, spec.with_overrides({"bits": bits}))
                             .to(weight.dtype))
                result[name][bits] = _loss(model, ids, batch_size, reference) - base
                weight.copy_(original)
    model.train(was_training)
    return result


def bits_per_weight(bits: int, group_size: int | None = None, symmetric: bool = True) -> float:
    """Stored bits per weight: the codes, plus a 16-bit scale (and, asymmetric, a zero point
    packed at `bits`) per group of `group_size` weights; no overhead when group_size is None."""
    return float(_bits_per_weight(bits, group_size, symmetric))


def _bits_per_weight(bits: int, group_size: int | None, symmetric: bool) -> Fraction:
    if group_size is None:
        return Fraction(bits)
    return bits + Fraction(SCALE_BITS + (0 if symmetric else bits), group_size)


def assign_bits(sensitivity: dict[str, dict[int, float]], numel: dict[str, int],
                budget_bits: float, choices: tuple[int, ...] | None = None, *,
                group_size: int | None = None, symmetric: bool = True) -> dict[str, int]:
    """Per-layer bits minimising the summed sensitivity with mean bits per weight <= budget.

    Costs are whole bits (exact rational arithmetic), so the dynamic program is exact whenever
    the bits left over the all-narrowest assignment, divided by their common divisor, fit in
    MAX_STATES; beyond that costs are rounded up, which can only waste budget, never exceed it.

    Args:
        sensitivity: {layer: {bits: loss increase}} (e.g. from `layer_sensitivity`).
        numel: {layer: number of weights}.
        budget_bits: allowed numel-weighted mean of `bits_per_weight` over the layers.
        choices: widths to choose from (default: those measured for every layer).
        group_size, symmetric: include the scale overhead in the cost (see `bits_per_weight`).
    Returns:
        {layer: bits}. Raises ValueError when even the narrowest width exceeds the budget.
    """
    names = list(sensitivity)
    if choices is None:
        choices = set.intersection(*(set(sensitivity[n]) for n in names))
    choices = tuple(sorted(choices))
    per_weight = {b: _bits_per_weight(b, group_size, symmetric) for b in choices}
    cost = {n: {b: math.ceil(numel[n] * per_weight[b]) for b in choices} for n in names}
    extra = {n: {b: cost[n][b] - cost[n][choices[0]] for b in choices} for n in names}
    total = sum(numel[n] for n in names)
    budget = Fraction(repr(float(budget_bits)))  # the decimal the user wrote: 5.6 is 28/5
    spare = math.floor(budget * total) - sum(cost[n][choices[0]] for n in names)
    if spare < 0:
        raise ValueError(f"budget_bits={budget_bits} is below the narrowest choice "
                         f"({float(per_weight[choices[0]]):.3f} bits per weight)")
    unit = math.gcd(*(e for row in extra.values() for e in row.values())) or 1
    unit = max(unit, math.ceil(spare / MAX_STATES))
    units = {n: {b: -(-extra[n][b] // unit) for b in choices} for n in names}
    picks = _knapsack([[sensitivity[n][b] for b in choices] for n in names],
                      [[units[n][b] for b in choices] for n in names], spare // unit)
    return {n: choices[c] for n, c in zip(names, picks)}


def _knapsack(values: list[list[float]], weights: list[list[int]], capacity: int) -> list[int]:
    """Multiple-choice knapsack, minimising: one choice per item, summed weight <= capacity."""
    dp = torch.full((capacity + 1,), math.inf, dtype=torch.float64)  # dp[w]: least loss at w
    dp[0] = 0.0
    picks = []
    for item_values, item_weights in zip(values, weights):
        new = torch.full_like(dp, math.inf)
        pick = torch.zeros(capacity + 1, dtype=torch.int8)
        for c, (v, w) in enumerate(zip(item_values, item_weights)):
            if w > capacity:
                continue
            cand = torch.full_like(dp, math.inf)
            cand[w:] = dp[: capacity + 1 - w] + v
            better = cand < new
            new, pick = torch.where(better, cand, new), torch.where(better, c, pick)
        dp = new
        picks.append(pick)
    state, chosen = int(torch.argmin(dp)), []
    for pick, item_weights in zip(reversed(picks), reversed(weights)):
        c = int(pick[state])
        chosen.append(c)
        state -= item_weights[c]
    return chosen[::-1]


def to_overrides(assignment: dict[str, int]) -> dict[str, dict[str, int]]:
    """The assignment as QuantConfig.overrides: exact layer names as patterns."""
    return {name: {"bits": bits} for name, bits in assignment.items()}


def linear_numel(model: nn.Module, names) -> dict[str, int]:
    """Weights per named Linear, for `assign_bits`."""
    modules = dict(model.named_modules())
    return {n: modules[n].weight.numel() for n in names}


@torch.no_grad()
def block_sensitivity(model: nn.Module, ids: torch.Tensor, groups: dict[str, dict[str, WeightSpec]],
                      choices: tuple[int, ...] = (2, 3, 4, 8), *, batch_size: int = 8
                      ) -> dict[str, dict[int, float]]:
    """KL increase of quantizing one group of layers (e.g. a decoder block) at a time with RTN.

    Per block instead of per layer: len(groups) * len(choices) forward passes, which a CPU can
    afford on a 30-block model where 210 layers * 4 widths would take hours.
    Returns {group: {bits: mean per-token KL to the float model}}.
    """
    modules = dict(model.named_modules())
    was_training = model.training
    model.eval()
    result: dict[str, dict[int, float]] = {}
    with fake_quant_disabled(model):
        reference = [torch.log_softmax(model(input_ids=b.to(_device(model)),
                                             use_cache=False).logits.float(), -1)
                     for b in ids.split(batch_size)]
        for group, layers in groups.items():
            originals = {n: modules[n].weight.detach().clone() for n in layers}
            result[group] = {}
            for bits in choices:
                for name, spec in layers.items():
                    modules[name].weight.copy_(fake_quant(originals[name], spec.with_overrides(
                        {"bits": bits})).to(originals[name].dtype))
                result[group][bits] = _loss(model, ids, batch_size, reference)
                for name in layers:
                    modules[name].weight.copy_(originals[name])
    model.train(was_training)
    return result


def mixed_precision(model: nn.Module, quant, ids: torch.Tensor, report) -> QuantConfig:
    """quant.budget_bits: per-block widths from measured sensitivity, as per-layer overrides.

    Each decoder block is quantized alone (RTN) at every width in quant.budget_choices and its
    KL to the float model measured on `ids` (ptq.sensitivity_samples sequences); a knapsack then
    picks the widths with the least total KL whose mean stored bits per weight meet the budget.
    User overrides still win over the chosen widths. `report`: the prepare plan (qat.quant.plan).
    """
    import re
    import time
    from dataclasses import replace

    groups: dict[str, dict] = {}
    for layer in report.layers:
        found = re.search(r"layers\.(\d+)\.", layer.name)
        groups.setdefault(f"block {found.group(1)}" if found else layer.name, {})[layer.name] = \
            layer.spec
    numel = {g: sum(l.in_features * l.out_features for l in report.layers if l.name in members)
             for g, members in groups.items()}
    start = time.perf_counter()
    sensitivity = block_sensitivity(model, ids, groups, quant.budget_choices)
    weight = quant.weight
    widths = assign_bits(sensitivity, numel, quant.budget_bits, quant.budget_choices,
                         group_size=weight.effective_group_size, symmetric=weight.symmetric)
    chosen = {name: {"bits": widths[g]} for g, members in groups.items() for name in members}
    counts = {b: list(widths.values()).count(b) for b in sorted(set(widths.values()))}
    print(f"mixed precision at {quant.budget_bits} bits per weight: blocks per width {counts} "
          f"({time.perf_counter() - start:.0f} s)")
    return replace(quant, overrides={**chosen, **quant.overrides})
