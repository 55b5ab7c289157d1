"""Multi-device strategies that need more than a YAML file can say."""
from __future__ import annotations

import functools
from typing import Any, Iterable

from torch import nn


def _wrap_by_name(module: nn.Module, recurse: bool, nonwrapped_numel: int,
                  names: frozenset[str]) -> bool:
    return recurse or type(module).__name__ in names


def fsdp(wrap: Iterable[str] = ("LlamaDecoderLayer",), **kwargs: Any):
    """Lightning's FSDPStrategy with one FSDP unit per module whose class name is in `wrap`.

    Class names, not classes, so one config serves every architecture; kwargs go to FSDPStrategy.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    policy = functools.partial(_wrap_by_name, names=frozenset(wrap))
    return FSDPStrategy(auto_wrap_policy=policy, **kwargs)
