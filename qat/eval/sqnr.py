"""Per-layer quantization error as SQNR (dB): which Linears the grid hurts most.

SQNR = 10 log10(|x|^2 / |x - Q(x)|^2): every bit of a uniform grid buys about 6 dB on
well-spread weights, so a layer 10 dB below its neighbours is the one to give more bits. Three views:
  weight:      the weight against its fake-quantized self;
  output:      the layer's output on the quantized model's own input, with its weight (and input)
               fake-quantizer off versus on: the error this layer alone adds;
  accumulated: the layer's output in the fully quantized model versus the float model, so error
               from every earlier layer is included.
"""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from qat.quant import FakeQuantLinear, set_fake_quant_enabled


def sqnr_db(signal: torch.Tensor, approx: torch.Tensor) -> float:
    """10 log10(|signal|^2 / |signal - approx|^2) in float64; +inf when they are equal."""
    signal, approx = signal.detach().double(), approx.detach().double()
    noise = (signal - approx).pow(2).sum().item()
    power = signal.pow(2).sum().item()
    if noise == 0.0:
        return math.inf
    if power == 0.0:
        return -math.inf
    return 10.0 * math.log10(power / noise)


def _layers(model: nn.Module) -> dict[str, FakeQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Eval mode (moving-average observers must not update while we measure), restored after, and
    every fake quantizer's `enabled` flag restored too."""
    was_training = model.training
    flags = [(q, q.enabled) for m in _layers(model).values()
             for q in (m.weight_fake_quant, m.input_fake_quant) if q is not None]
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for quantizer, enabled in flags:
            quantizer.enabled = enabled


@torch.no_grad()
def weight_sqnr(model: nn.Module) -> dict[str, float]:
    """Weight SQNR (dB) of every FakeQuantLinear, whether or not its quantizer is enabled now.

    A model sharded by FSDP2 has each unit's weights gathered while its layers are measured, one
    unit at a time (a collective: every rank calls this)."""
    out = {}
    with _frozen(model):
        for unit, layers in _by_unit(model):
            with _gathered(unit):
                out.update({name: _held_db(*m.held_sqnr_terms()) if m.holds_codes
                            else sqnr_db(m.weight, m.weight_fake_quant.dequantized(m.weight))
                            for name, m in layers.items()})
    return out


def _by_unit(model: nn.Module) -> list[tuple[nn.Module | None, dict[str, FakeQuantLinear]]]:
    """The FakeQuantLinears grouped by the FSDP2 unit holding their parameters (the innermost
    one around them); one group with no unit when the model is not sharded."""
    from torch.distributed.fsdp import FSDPModule

    units = {name: m for name, m in model.named_modules() if isinstance(m, FSDPModule)}
    if not units:
        return [(None, _layers(model))]
    owned: dict[str, dict[str, FakeQuantLinear]] = {}
    for name, layer in _layers(model).items():
        owner = max((u for u in units if u == "" or name.startswith(u + ".")), key=len)
        owned.setdefault(owner, {})[name] = layer
    return [(units[u], layers) for u, layers in owned.items()]


@contextmanager
def _gathered(unit: nn.Module | None) -> Iterator[None]:
    if unit is None:
        yield
        return
    unit.unshard()
    try:
        yield
    finally:
        unit.reshard()


def _held_db(power: float, noise: float) -> float:
    """SQNR (dB) of a codes-held layer from its kept sums (FakeQuantLinear.held_sqnr_terms)."""
    if noise <= power * 1e-15:  # exact up to the rounding of the sums
        return math.inf
    return 10.0 * math.log10(power / noise) if power > 0 else -math.inf


@torch.no_grad()
def output_sqnr(model: nn.Module, input_ids: torch.Tensor) -> dict[str, dict[str, float]]:
    """Output SQNR (dB) of every FakeQuantLinear on one batch: {"output": ..., "accumulated": ...}.

    Two forward passes: float (every quantizer off) and quantized (every one on). Memory: one float
    copy of each quantized layer's output for the batch (SmolLM2-135M at (1, 512): about 320 MB).
    """
    layers = _layers(model)
    held = [n for n, m in layers.items() if m.holds_codes]
    if held:
        raise ValueError(f"output SQNR needs the float model, but {len(held)} layer(s) hold only "
                         f"their integer codes (optim.trainable=scales), e.g. {held[0]}")
    float_out: dict[str, torch.Tensor] = {}
    result: dict[str, dict[str, float]] = {}

    def keep_float(name):
        return lambda mod, args, out: float_out.__setitem__(name, out.detach().float())

    def compare(name):
        def hook(mod, args, out):
            local = F.linear(args[0], mod.weight, mod.bias)  # same input, quantizers off
            result[name] = {"output": sqnr_db(local, out), "accumulated": sqnr_db(float_out[name], out)}
        return hook

    with _frozen(model):
        for enabled, make in ((False, keep_float), (True, compare)):
            set_fake_quant_enabled(model, enabled)
            handles = [m.register_forward_hook(make(n)) for n, m in layers.items()]
            try:
                model(input_ids=input_ids, use_cache=False)
            finally:
                for h in handles:
                    h.remove()
    return result


def _json_db(value: float) -> float | None:
    """Infinite SQNR (the weight is already on the grid) becomes null: JSON has no infinity."""
    return round(value, 3) if math.isfinite(value) else None


def sqnr_table(model: nn.Module, input_ids: torch.Tensor | None = None) -> list[dict]:
    """One JSON-ready row per FakeQuantLinear, worst weight SQNR first.

    Returns:
        [{"layer", "scheme", "weight_sqnr_db", and with `input_ids` "output_sqnr_db",
        "accumulated_sqnr_db"}]; null dB means exact (no error at all).
    """
    layers = _layers(model)
    weights = weight_sqnr(model)
    outputs = output_sqnr(model, input_ids) if input_ids is not None else {}
    rows = []
    for name in sorted(layers, key=lambda n: (weights[n], n)):
        row = {"layer": name, "scheme": layers[name].weight_fake_quant.spec.describe(),
               "weight_sqnr_db": _json_db(weights[name])}
        if name in outputs:
            row["output_sqnr_db"] = _json_db(outputs[name]["output"])
            row["accumulated_sqnr_db"] = _json_db(outputs[name]["accumulated"])
        rows.append(row)
    return rows
