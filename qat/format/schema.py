"""The compressed-tensors `pack-quantized` schema: config.json's `quantization_config`, both ways.

A scheme here is four plain fields (bits, strategy, group size, symmetry): the quantizer's
`WeightSpec` says more (observer, learnable scales) but the file stores only these. Facts:
../shared/formats/compressed-tensors.md.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, NamedTuple

from qat.format.shards import WEIGHTS_FILE  # noqa: F401 (where readers have found it)

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
STRATEGIES = ("tensor", "channel", "group")


class Scheme(NamedTuple):
    """What the file says of one group of layers' weights."""

    bits: int
    strategy: str  # tensor | channel | group
    group_size: int | None  # only for strategy=group
    symmetric: bool


def _ct_version() -> str:
    try:
        from importlib.metadata import version
        return version("compressed-tensors")
    except Exception:  # not installed: the format version we write against
        return "0.12.0"


def weight_args(scheme: Scheme) -> dict[str, Any]:
    """The `weights` entry of a config group (validated upstream with extra="forbid")."""
    return {"num_bits": scheme.bits, "type": "int", "symmetric": scheme.symmetric,
            "strategy": scheme.strategy, "group_size": scheme.group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}


def scheme_from_args(args: dict[str, Any], where: str) -> Scheme:
    """Inverse of `weight_args`, with a clear error for what we cannot serve."""
    if args.get("type", "int") != "int":
        raise ValueError(f"{where}: weights type {args.get('type')!r} is not supported; only 'int'")
    if args.get("actorder") == "group":  # groups follow a stored permutation (weight_g_idx)
        raise ValueError(f"{where}: weights actorder='group' (a weight_g_idx permutation of the "
                         "groups) is not supported; only checkpoints whose groups are contiguous "
                         "(actorder null, 'static' or 'weight') load")
    strategy = args.get("strategy")
    if strategy not in STRATEGIES:
        raise ValueError(f"{where}: weight strategy {strategy!r} is not supported; "
                         f"allowed: {', '.join(STRATEGIES)}")
    return Scheme(bits=int(args["num_bits"]), strategy=strategy,
                  group_size=args.get("group_size") if strategy == "group" else None,
                  symmetric=bool(args.get("symmetric", True)))


def _exact(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def quantization_config(schemes: dict[str, Scheme], ignore: list[str],
                        by_name: bool = False) -> dict[str, Any]:
    """config.json's `quantization_config` for layer name -> scheme: one config group per scheme.

    A single scheme targets the class name "Linear" (ignoring the float Linears); mixed precision,
    or `by_name` (layers whose class is not Linear, e.g. GPT-2's Conv1D), gets one group per scheme
    whose targets are the exact module names.
    """
    by_scheme: dict[Scheme, list[str]] = {}
    for name, scheme in schemes.items():
        by_scheme.setdefault(Scheme(*scheme), []).append(name)
    single = len(by_scheme) == 1 and not by_name
    groups = {}
    for i, (scheme, names) in enumerate(by_scheme.items()):
        groups[f"group_{i}"] = {"targets": ["Linear"] if single else [_exact(n) for n in names],
                                "format": FORMAT, "input_activations": None,
                                "output_activations": None, "weights": weight_args(scheme)}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "version": _ct_version(), "sparsity_config": {}, "transform_config": {},
            "kv_cache_scheme": None, "global_compression_ratio": None, "ignore": sorted(ignore),
            "config_groups": groups}


def read_config(directory: str | Path) -> dict[str, Any]:
    """config.json of an export, checked to be compressed-tensors pack-quantized."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json; is {directory} an export directory?")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    qc = config.get("quantization_config")
    if not isinstance(qc, dict):
        raise ValueError(f"{path}: no quantization_config; not a quantized export")
    if qc.get("quant_method") != QUANT_METHOD:
        raise ValueError(f"{path}: quantization_config.quant_method={qc.get('quant_method')!r} is "
                         f"not supported; expected {QUANT_METHOD!r}")
    if qc.get("format") != FORMAT:
        raise ValueError(f"{path}: quantization_config.format={qc.get('format')!r} is not "
                         f"supported; expected {FORMAT!r}")
    return config
