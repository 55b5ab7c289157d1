"""Unknown config keys fail before any work, naming the key and the accepted ones.

Hydra composes whatever it is given (`+trainer.max_step=20`, `+quant.weight.bitz=3`); without this
check a typo surfaces after the model loaded, as a TypeError from a constructor, or not at all for
the plain sections of train.yaml that code reads with `.get`. What is accepted: for a node with a
`_target_`, the parameters of that class or function (a dataclass's fields; nested dataclass fields
recursively); for the plain sections and the top level, the keys train.yaml declares.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import typing
from functools import lru_cache
from pathlib import Path

from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

# Hydra's own keys on a node that it instantiates
_HYDRA_KEYS = {"_target_", "_convert_", "_recursive_", "_partial_", "_args_"}
TRAIN_YAML = Path(__file__).resolve().parents[1] / "conf" / "train.yaml"


class UnknownKeyError(ValueError):
    """A config key that nothing reads."""


@lru_cache(maxsize=None)
def declared_sections() -> dict[str, frozenset[str] | None]:
    """train.yaml's top-level keys -> their sub-keys (None: a scalar, no sub-keys)."""
    base = OmegaConf.load(TRAIN_YAML)
    sections = {str(k): (frozenset(str(s) for s in v) if isinstance(v, DictConfig) else None)
                for k, v in base.items() if k not in ("defaults", "hydra")}
    return {**sections, **{g: None for g in config_groups()}}


@lru_cache(maxsize=None)
def config_groups() -> tuple[str, ...]:
    """The groups train.yaml's defaults list composes (model, data, trainer, ..., recipe)."""
    base = OmegaConf.load(TRAIN_YAML)
    return tuple(next(iter(d)) for d in base.defaults
                 if isinstance(d, DictConfig) and not str(next(iter(d))).startswith("override"))


def _fields_of(kind) -> tuple[set[str] | None, dict[str, type]]:
    """(accepted names, nested dataclass types by name) of a class or function; names None when
    it takes **kwargs (anything goes)."""
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        nested = {}
        for f in dataclasses.fields(kind):
            inner = [t for t in (typing.get_args(hints[f.name]) or (hints[f.name],))
                     if dataclasses.is_dataclass(t)]
            if inner:
                nested[f.name] = inner[0]
        return {f.name for f in dataclasses.fields(kind) if f.init}, nested
    target = kind.__init__ if inspect.isclass(kind) else kind
    params = inspect.signature(target).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None, {}
    return set(params) - {"self"}, {}


def _fail(path: str, key: str, accepted) -> None:
    accepted = sorted(accepted)
    close = difflib.get_close_matches(key, accepted, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    where = f"{path}.{key}" if path else key
    raise UnknownKeyError(f"{where} is not a known key{hint}; {path or 'the top level'} accepts: "
                          f"{', '.join(accepted)}")


def _check_node(node: DictConfig, path: str, kind=None) -> None:
    target = node.get("_target_") if kind is None else None
    if kind is None and target is None:
        return
    if kind is None:
        try:
            kind = get_object(str(target))
        except Exception as err:  # noqa: BLE001 - Hydra raises several kinds
            raise UnknownKeyError(f"{path}._target_={target!r} cannot be imported: {err}") from err
    accepted, nested = _fields_of(kind)
    if accepted is None:
        return
    for key in node:
        key = str(key)
        if key in _HYDRA_KEYS:
            continue
        if key not in accepted:
            _fail(path, key, accepted)
        child = None if OmegaConf.is_missing(node, key) else node[key]
        if isinstance(child, DictConfig):
            _check_node(child, f"{path}.{key}", None if "_target_" in child else nested.get(key))


def check_keys(cfg: DictConfig) -> None:
    """Raise UnknownKeyError for the first key of `cfg` that no code reads."""
    sections = declared_sections()
    for key in cfg:
        key = str(key)
        if key not in sections:
            _fail("", key, sections)
        node = cfg[key]
        if not isinstance(node, DictConfig):
            continue
        if key == "callbacks":  # name -> a callback node each
            for name in node:
                if not isinstance(node[name], DictConfig) or "_target_" not in node[name]:
                    raise UnknownKeyError(f"callbacks.{name} must be a callback config with a "
                                          f"_target_ (see qat/conf/callbacks/lr_monitor.yaml)")
                _check_node(node[name], f"callbacks.{name}")
        elif sections[key] is not None and "_target_" not in node:
            for sub in node:
                if str(sub) not in sections[key]:
                    _fail(key, str(sub), sections[key])
        else:
            _check_node(node, key)
