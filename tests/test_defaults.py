"""Each default is written once: where a config file shows a value, the spec class it instantiates
either has no default for that field or the same one.

Checked for train.yaml's own sections and the option of every group that train.yaml's defaults
list picks (the values a run gets when nothing is overridden); recipes and other options are
overrides by design. Nested specs (quant.weight, distill.teacher) are compared field by field.
"""
import dataclasses
import typing
from pathlib import Path

import pytest
from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "qat" / "conf"


def default_nodes() -> dict[str, DictConfig]:
    """'where' -> a config node with a _target_: train.yaml's sections and its default options."""
    base = OmegaConf.load(CONF / "train.yaml")
    nodes = {f"train.yaml:{k}": v for k, v in base.items()
             if isinstance(v, DictConfig) and "_target_" in v}
    for entry in base.defaults:
        if not isinstance(entry, DictConfig):
            continue
        group, option = next(iter(entry.items()))
        path = CONF / str(group) / f"{option}.yaml"
        if path.is_file():
            node = OmegaConf.load(path)
            if "_target_" in node:
                nodes[f"{group}/{option}.yaml"] = node
    return nodes


def plain(value):
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value)
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


def disagreements(node: DictConfig, kind, where: str) -> list[str]:
    hints = typing.get_type_hints(kind)
    fields = {f.name: f for f in dataclasses.fields(kind)}
    out = []
    for key in node:
        key = str(key)
        if key.startswith("_") or key not in fields or OmegaConf.is_interpolation(node, key):
            continue
        field = fields[key]
        nested = [t for t in (typing.get_args(hints[key]) or (hints[key],))
                  if dataclasses.is_dataclass(t)]
        if nested and isinstance(node[key], DictConfig):
            out += disagreements(node[key], nested[0], f"{where}.{key}")
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            continue
        if plain(node[key]) != plain(default):
            out.append(f"{where}.{key}: the YAML says {plain(node[key])!r}, "
                       f"{kind.__name__} says {plain(default)!r}")
    return out


NODES = default_nodes()


def test_the_defaults_are_found():
    assert {"train.yaml:optim", "train.yaml:eval", "train.yaml:export", "train.yaml:checkpoint",
            "train.yaml:guard", "quant/default.yaml", "ptq/default.yaml",
            "blockwise/none.yaml", "distill/none.yaml", "data/wiki.yaml"} <= set(NODES)


@pytest.mark.parametrize("where", sorted(NODES))
def test_yaml_and_spec_agree(where):
    node = NODES[where]
    kind = get_class(node._target_)
    if not dataclasses.is_dataclass(kind):
        pytest.skip(f"{node._target_} is not a spec dataclass")
    assert not disagreements(node, kind, where)


def test_a_disagreement_is_caught():
    from qat.lightning.module import OptimSpec

    node = OmegaConf.create({"_target_": "qat.lightning.module.OptimSpec", "warmup_steps": 99,
                             "betas": [0.9, 0.95]})
    assert disagreements(node, OptimSpec, "x") == [
        "x.warmup_steps: the YAML says 99, OptimSpec says " + repr(OptimSpec().warmup_steps)]
