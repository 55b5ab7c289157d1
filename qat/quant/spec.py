"""Quantization specs: frozen dataclasses that Hydra fills and that validate themselves.

A spec says *what* grid a tensor lives on; the fake quantizers and the exporter read the same spec,
so what is trained is what is served.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from qat.format.schema import Scheme

WEIGHT_GRANULARITIES = ("tensor", "channel", "group")
ACTIVATION_GRANULARITIES = ("token", "tensor")
OBSERVERS = ("minmax", "moving_average")
SCALE_DTYPES = ("bfloat16", "float16", "float32")
MIN_BITS, MAX_BITS = 2, 8


def _check_choice(owner: str, name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name}={value!r} is not allowed; choose one of {list(allowed)}")


def _check_bits(owner: str, bits: Any) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{owner}.bits={bits!r} is not allowed; bits must be an integer in "
                         f"{MIN_BITS}..{MAX_BITS}")


@dataclass(frozen=True)
class WeightSpec:
    """How a Linear weight is fake-quantized (and later packed).

    Numerics follow compressed-tensors: integer zero point, symmetric scale = absmax / ((2^b - 1) / 2).
    """

    bits: int = 4  # 2..8
    granularity: str = "group"  # tensor | channel (one scale per output row) | group
    group_size: int | None = 64  # input elements per scale; only for granularity=group
    symmetric: bool = True  # False adds an integer zero point per scale
    observer: str = "minmax"  # minmax: scale from the current weight; moving_average: EMA of min/max
    averaging_constant: float = 0.01  # EMA weight of the newest min/max (moving_average only)
    learnable_scale: bool = False  # LSQ: scales become parameters with the LSQ gradient scaling
    scale_dtype: str = "bfloat16"  # scales are rounded to the dtype the export stores them in

    def __post_init__(self) -> None:
        _check_bits("quant.weight", self.bits)
        _check_choice("quant.weight", "granularity", self.granularity, WEIGHT_GRANULARITIES)
        _check_choice("quant.weight", "observer", self.observer, OBSERVERS)
        _check_choice("quant.weight", "scale_dtype", self.scale_dtype, SCALE_DTYPES)
        if self.granularity == "group":
            gs = self.group_size
            if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
                raise ValueError(f"quant.weight.group_size={gs!r} is not allowed; with "
                                 "granularity=group it must be a positive integer (e.g. 32, 64, 128)")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"quant.weight.averaging_constant={self.averaging_constant!r} must be "
                             "in (0, 1]")
        if self.learnable_scale and self.observer != "minmax":
            raise ValueError("quant.weight.learnable_scale=true initialises scales once; set "
                             "quant.weight.observer=minmax with it")

    @property
    def effective_group_size(self) -> int | None:
        return self.group_size if self.granularity == "group" else None

    @property
    def scheme(self) -> Scheme:
        """What an export stores of this spec."""
        return Scheme(self.bits, self.granularity, self.effective_group_size, self.symmetric)

    @classmethod
    def from_scheme(cls, scheme: Scheme) -> "WeightSpec":
        return cls(bits=scheme.bits, granularity=scheme.strategy, group_size=scheme.group_size,
                   symmetric=scheme.symmetric)

    def describe(self) -> str:
        """Short scheme name such as 'W4 g64 sym' used in reports."""
        gran = {"tensor": "per-tensor", "channel": "per-channel"}.get(
            self.granularity, f"g{self.group_size}")
        return f"W{self.bits} {gran} {'sym' if self.symmetric else 'asym'}"

    def with_overrides(self, changes: Mapping[str, Any]) -> "WeightSpec":
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"quant.overrides sets unknown weight field(s) {unknown}; "
                             f"allowed: {sorted(known)}")
        return replace(self, **dict(changes))


@dataclass(frozen=True)
class ActivationSpec:
    """Dynamic activation quantization: scales computed from each input at run time."""

    bits: int = 8  # 2..8; int8 per token is the usual W8A8 / W4A8 choice
    granularity: str = "token"  # token: one scale per row of the last dim; tensor: one scale
    symmetric: bool = True

    def __post_init__(self) -> None:
        _check_bits("quant.activation", self.bits)
        _check_choice("quant.activation", "granularity", self.granularity,
                      ACTIVATION_GRANULARITIES)

    def describe(self) -> str:
        return f"A{self.bits} per-{self.granularity} {'sym' if self.symmetric else 'asym'} dynamic"


@dataclass(frozen=True)
class QuantConfig:
    """Which Linears get which scheme, and when fake quantization starts."""

    weight: WeightSpec | None = field(default_factory=WeightSpec)  # None: train in float
    activation: ActivationSpec | None = None  # None: weight-only
    # fnmatch patterns on module names; None: every projection inside the decoder blocks
    include: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ("lm_head", "*embed*")
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # pattern -> fields
    start_step: int = 0  # fake quantization switches on at this optimizer step
    init: str | None = None  # PTQ before training: rtn | gptq | awq | smoothquant (settings: ptq.*)
    budget_bits: float | None = None  # mixed precision: mean stored bits per weight (e.g. 3.5)
    budget_choices: tuple[int, ...] = (2, 3, 4, 8)  # widths the budget may give a decoder block

    def prepare(self, model):
        """Swap fake quantization into `model` (qat.quant.prepare): what rebuilding a run from its
        checkpoint (qat.models.checkpoint) calls on the spec its config names, so models need
        not import quant."""
        from qat.quant.swap import prepare

        return prepare(model, self)

    def __post_init__(self) -> None:
        if isinstance(self.weight, Mapping):  # filled without _target_ (plain dict config)
            object.__setattr__(self, "weight", WeightSpec(**self.weight))
        if isinstance(self.activation, Mapping):
            object.__setattr__(self, "activation", ActivationSpec(**self.activation))
        for name in ("include", "exclude"):
            value = getattr(self, name)
            if value is None and name == "include":
                continue
            if isinstance(value, str) or not all(isinstance(p, str) for p in value):
                raise ValueError(f"quant.{name} must be a list of name patterns, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if self.include is not None and not self.include and self.weight is not None:
            raise ValueError("quant.include is empty; give at least one module-name pattern, or "
                             "null for every projection inside the decoder blocks")
        if not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"quant.start_step={self.start_step!r} must be an integer >= 0")
        inits = (None, "rtn", "gptq", "awq", "smoothquant")
        if self.init not in inits:
            raise ValueError(f"quant.init={self.init!r} is not one of {inits}")
        object.__setattr__(self, "budget_choices", tuple(self.budget_choices))
        for bits in self.budget_choices:
            _check_bits("quant.budget_choices", bits)
        if self.budget_bits is not None:
            low, high = min(self.budget_choices, default=0), max(self.budget_choices, default=0)
            if not isinstance(self.budget_bits, (int, float)) or isinstance(self.budget_bits, bool) \
                    or not low <= self.budget_bits <= high + 1:
                raise ValueError(f"quant.budget_bits={self.budget_bits!r} must be a number between "
                                 f"the smallest and largest of quant.budget_choices "
                                 f"{self.budget_choices} (plus scale overhead)")
            if self.weight is None:
                raise ValueError("quant.budget_bits needs quant.weight to be set")
        if self.init is not None and self.weight is None:
            raise ValueError("quant.init needs quant.weight to be set")
        if self.init is not None and self.start_step:
            raise ValueError(f"quant.init={self.init!r} quantizes before training: it needs "
                             f"quant.start_step=0, got {self.start_step}")
        overrides = {str(k): dict(v) for k, v in dict(self.overrides or {}).items()}
        if overrides and self.weight is None:
            raise ValueError("quant.overrides needs quant.weight to be set")
        for pattern, changes in overrides.items():
            self.weight.with_overrides(changes)  # validates field names and values now
        object.__setattr__(self, "overrides", overrides)

    def spec_for(self, name: str, matches) -> WeightSpec:
        """The weight spec of module `name`: the base spec with every matching override applied
        in order (later patterns win)."""
        spec = self.weight
        for pattern, changes in self.overrides.items():
            if matches(name, pattern):
                spec = spec.with_overrides(changes)
        return spec
