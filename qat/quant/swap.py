"""`prepare` swaps chosen Linears for fake-quantized ones; `unprepare` gives plain Linears back
(the served model is qat.export.convert's); `set_trainable` picks what the end-to-end stage trains."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

from torch import nn

from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import QuantConfig, WeightSpec
from qat.models.experts import (names_router, per_expert_checkpoint, routers,
                               vllm_reads_experts)
from qat.models.structure import (as_linear, block_patterns, features, is_projection,
                                  source_class)


def matches(name: str, pattern: str) -> bool:
    """Shell-style match on a dotted module name; `re:` prefixes a regular expression."""
    if pattern.startswith("re:"):
        import re
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    spec: WeightSpec
    activation: str | None
    kind: str = "Linear"  # the model's own class for the layer (Conv1D: stored transposed)
    per_expert_checkpoint: bool = True  # an MoE expert whose family's checkpoints store it alone
    vllm_reads: bool = True  # vLLM's loader for its family takes it per expert (not GPT-OSS)

    @property
    def scheme(self) -> str:
        return self.spec.describe() + (f" + {self.activation}" if self.activation else "")


@dataclass
class PrepareReport:
    """Which module got which scheme: the record a user checks before spending compute."""

    layers: list[LayerReport] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # Linears left in float
    routers: list[str] = field(default_factory=list)  # MoE routers: not Linears, kept in float

    def schemes(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.layers:
            counts[layer.scheme] = counts.get(layer.scheme, 0) + 1
        return counts

    def __str__(self) -> str:
        lines = [f"quantized {len(self.layers)} Linear layers, {len(self.skipped)} left in float"]
        lines += [f"  {n:4d} x {scheme}" for scheme, n in self.schemes().items()]
        if self.skipped:
            lines.append("  float: " + ", ".join(self.skipped[:6])
                         + (" ..." if len(self.skipped) > 6 else ""))
        experts = sum(".experts." in layer.name for layer in self.layers)
        if experts or self.routers:
            lines.append(f"  MoE: {experts} expert projections quantized, {len(self.routers)} "
                         "routers in float")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"layers": {l.name: l.scheme for l in self.layers}, "float": list(self.skipped)}
        return {**out, "routers": list(self.routers)} if self.routers else out


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_projection(m)]


def include_patterns(model: nn.Module, include: tuple[str, ...] | None) -> tuple[str, ...]:
    """`include` as given, or (None) every projection inside the model's decoder blocks."""
    return block_patterns(model) if include is None else include


def _check_patterns(config: QuantConfig, names: list[str], include: tuple[str, ...]) -> None:
    sample = ", ".join(names[:4]) + (" ..." if len(names) > 4 else "")
    for field_name, patterns in (("include", include if config.include is not None else ()),
                                 ("overrides", tuple(config.overrides))):
        for pattern in patterns:
            if not any(matches(n, pattern) for n in names):
                raise ValueError(f"quant.{field_name} pattern {pattern!r} matches no Linear module; "
                                 f"Linear names look like: {sample}")


def plan(model: nn.Module, config: QuantConfig) -> PrepareReport:
    """Decide each Linear's scheme and check it fits, without changing the model."""
    if config.weight is None:
        raise ValueError("quant.weight is null: nothing to quantize")
    names = _linear_names(model)
    include = include_patterns(model, config.include)
    _check_patterns(config, names, include)
    report = PrepareReport()
    modules = dict(model.named_modules())
    gates = set(routers(model))  # MoE routers stay in float unless a pattern names them
    for name in names:
        chosen = any(matches(name, p) for p in include) and \
            not any(matches(name, p) for p in config.exclude)
        if name in gates and not any(matches(name, p) and names_router(p, name)
                                     for p in config.include or ()):
            continue
        if not chosen:
            report.skipped.append(name)
            continue
        in_features, out_features = features(modules[name])
        spec = config.spec_for(name, matches)
        if spec.granularity == "group" and in_features % spec.group_size:
            raise ValueError(
                f"quant.weight.group_size={spec.group_size} does not divide in_features="
                f"{in_features} of layer {name!r}; choose a group size that divides it "
                "(e.g. 32 or 64), granularity=channel, or add an override for that layer")
        activation = config.activation.describe() if config.activation else None
        report.layers.append(LayerReport(name, in_features, out_features, spec, activation,
                                         source_class(modules[name]),
                                         per_expert_checkpoint(model, name),
                                         vllm_reads_experts(model, name)))
    if not report.layers:
        raise ValueError("quant.include/exclude select no Linear module to quantize")
    report.routers = sorted(gates - {layer.name for layer in report.layers})
    return report


def prepare(model: nn.Module, config: QuantConfig) -> PrepareReport:
    """Swap the chosen projections of `model` in place for FakeQuantLinear (a Conv1D becomes the
    Linear it is, its weight transposed once).

    Returns the report of which module got which scheme. Raises ValueError before touching the
    model when a pattern matches nothing or a group size does not fit a layer.
    """
    report = plan(model, config)
    for layer in report.layers:
        parent, child = _parent(model, layer.name)
        setattr(parent, child, FakeQuantLinear.from_linear(as_linear(getattr(parent, child)),
                                                          layer.spec, config.activation))
    return report


def unprepare(model: nn.Module, bake: bool = True) -> nn.Module:
    """Undo `prepare`: every FakeQuantLinear becomes a plain nn.Linear again, in place (the served
    model of packed layers is `qat.export.convert`).

    With `bake` the new weights are the fake-quantized weights, so the plain model computes what the
    weight-quantized model computed; without it, the float weights come back.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, FakeQuantLinear):
            parent, child = _parent(model, name)
            setattr(parent, child, module.to_linear(bake=bake))
    return model


def fake_quant_modules(model: nn.Module):
    for module in model.modules():
        if isinstance(module, FakeQuantLinear):
            yield module


def set_fake_quant_enabled(model: nn.Module, enabled: bool) -> None:
    """Switch every fake quantizer on or off (e.g. float warm-up before `quant.start_step`)."""
    for module in fake_quant_modules(model):
        module.weight_fake_quant.enabled = enabled
        if module.input_fake_quant is not None:
            module.input_fake_quant.enabled = enabled


TRAINABLE = ("weights", "scales", "all")


def keeps_codes_only(trainable: str) -> bool:
    """optim.trainable=scales: the float weights never train again after the block stage, so a
    trained block keeps its integer codes alone (and is saved that way)."""
    return trainable == "scales"


def set_trainable(model: nn.Module, trainable: str) -> None:
    """optim.trainable for the end-to-end stage.

    weights: the weights train on the grid quant.init / the block stage left (as before).
    scales: every quantized weight is frozen on its integer codes and only the scales train
    (EfficientQAT's E2E-QP: few parameters, little optimizer memory); nothing else trains.
    all: weights, scales and zero points train together.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"optim.trainable={trainable!r} is not one of {TRAINABLE}")
    if trainable == "weights":
        return
    codes_only = keeps_codes_only(trainable)
    if codes_only:
        model.requires_grad_(False)
    for module in fake_quant_modules(model):
        fq = module.weight_fake_quant
        if codes_only:
            fq.freeze_codes(module.weight_like())
        for p in fq.learn_grid(module.weight_like(), zero_point=trainable == "all"):
            p.requires_grad_(True)
        if codes_only:
            module.hold_codes()  # the float weight can no longer change the output


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child
