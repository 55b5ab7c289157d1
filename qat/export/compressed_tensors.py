"""Write and read the compressed-tensors `pack-quantized` format (what vLLM loads).

Every quantized Linear `P` becomes `P.weight_packed` (int32), `P.weight_scale` (bf16),
`P.weight_shape` (int64) and, when asymmetric, `P.weight_zero_point` (int32, packed along dim 0);
everything else is stored in bf16. Facts: ../shared/formats/compressed-tensors.md.
"""
from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.export.pack import pack, pack_zero_points
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import WeightSpec
from qat.quant.structure import stored_transposed

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
WEIGHTS_FILE = "model.safetensors"


def _ct_version() -> str:
    try:
        from importlib.metadata import version
        return version("compressed-tensors")
    except Exception:  # not installed: the format version we write against
        return "0.12.0"


def weight_args(spec: WeightSpec) -> dict[str, Any]:
    """The `weights` entry of a config group (validated upstream with extra="forbid")."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": spec.granularity, "group_size": spec.effective_group_size,
            "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
            "observer_kwargs": {}, "scale_dtype": None, "zp_dtype": None}


def spec_from_args(args: dict[str, Any], where: str) -> WeightSpec:
    """Inverse of `weight_args`, with a clear error for what we cannot serve."""
    if args.get("type", "int") != "int":
        raise ValueError(f"{where}: weights type {args.get('type')!r} is not supported; only 'int'")
    if args.get("actorder") == "group":  # groups follow a stored permutation (weight_g_idx)
        raise ValueError(f"{where}: weights actorder='group' (a weight_g_idx permutation of the "
                         "groups) is not supported; only checkpoints whose groups are contiguous "
                         "(actorder null, 'static' or 'weight') load")
    strategy = args.get("strategy")
    if strategy not in ("tensor", "channel", "group"):
        raise ValueError(f"{where}: weight strategy {strategy!r} is not supported; "
                         "allowed: tensor, channel, group")
    return WeightSpec(bits=int(args["num_bits"]), granularity=strategy,
                      group_size=args.get("group_size") if strategy == "group" else None,
                      symmetric=bool(args.get("symmetric", True)))


def _exact(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def quantization_config(specs: dict[str, WeightSpec], ignore: list[str],
                        by_name: bool = False) -> dict[str, Any]:
    """config.json's `quantization_config`: one config group per distinct scheme.

    A single scheme targets the class name "Linear" (ignoring the float Linears); mixed precision,
    or `by_name` (layers whose class is not Linear, e.g. GPT-2's Conv1D), gets one group per scheme
    whose targets are the exact module names.
    """
    by_scheme: dict[WeightSpec, list[str]] = {}
    for name, spec in specs.items():
        key = WeightSpec(bits=spec.bits, granularity=spec.granularity,
                         group_size=spec.effective_group_size, symmetric=spec.symmetric)
        by_scheme.setdefault(key, []).append(name)
    single = len(by_scheme) == 1 and not by_name
    groups = {}
    for i, (spec, names) in enumerate(by_scheme.items()):
        groups[f"group_{i}"] = {"targets": ["Linear"] if single else [_exact(n) for n in names],
                                "format": FORMAT, "input_activations": None,
                                "output_activations": None, "weights": weight_args(spec)}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "version": _ct_version(), "sparsity_config": {}, "transform_config": {},
            "kv_cache_scheme": None, "global_compression_ratio": None, "ignore": sorted(ignore),
            "config_groups": groups}


@dataclass
class PackedLayer:
    """The stored tensors of one quantized Linear."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_shape: torch.Tensor
    weight_zero_point: torch.Tensor | None


def pack_layer(module: FakeQuantLinear, scale_dtype: torch.dtype = torch.bfloat16) -> PackedLayer:
    """Codes, scales and zero points exactly as the fake quantizer's forward pass uses them."""
    spec = module.weight_fake_quant.spec
    q, scale, zp = module.weight_fake_quant.quantized(module.weight)  # (out, in), (out, G), (out, G)
    if spec.granularity == "tensor":
        scale, zp = scale.reshape(1), zp.reshape(1)
    zero_point = None
    if not spec.symmetric:
        zero_point = pack_zero_points(zp.reshape(scale.shape[0], -1).to(torch.int32), spec.bits) \
            if spec.granularity != "tensor" else zp.to(torch.int32)
    return PackedLayer(weight_packed=pack(q, spec.bits),
                       weight_scale=scale.to(scale_dtype).contiguous(),
                       weight_shape=torch.tensor(list(module.weight.shape), dtype=torch.int64),
                       weight_zero_point=zero_point)


def compressed_state_dict(model: nn.Module, dtype: torch.dtype = torch.bfloat16
                          ) -> tuple[dict[str, torch.Tensor], dict[str, WeightSpec], list[str]]:
    """The tensors to store, the spec of each quantized Linear, and the Linears kept in float."""
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, WeightSpec] = {}
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    for name, module in quantized.items():
        layer = pack_layer(module)
        specs[name] = module.weight_fake_quant.spec
        for key, value in vars(layer).items():
            if value is not None:
                tensors[f"{name}.{key}"] = value
        if module.bias is not None:
            tensors[f"{name}.bias"] = module.bias.detach().to(dtype)
    skip = {f"{n}.{p}" for n in quantized for p in ("weight", "bias")}
    # float Linears made from a Conv1D go back to the (in, out) layout the model's class reads
    transposed = {f"{n}.weight" for n, m in model.named_modules()
                  if n not in quantized and stored_transposed(m)}
    seen: dict[int, str] = {}
    for key, value in model.state_dict(keep_vars=False).items():
        if key in skip or ".weight_fake_quant." in key or ".input_fake_quant." in key:
            continue
        if value.data_ptr() in seen and getattr(model.config, "tie_word_embeddings", False):
            continue  # tied lm_head: transformers re-ties it on load
        seen[value.data_ptr()] = key
        if key in transposed:
            value = value.t()
        tensors[key] = value.detach().to(dtype) if value.is_floating_point() else value
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
              and not isinstance(m, FakeQuantLinear) and not stored_transposed(m)]
    return {k: v.contiguous() for k, v in tensors.items()}, specs, ignore


@contextmanager
def as_exported(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> Iterator[nn.Module]:
    """Temporarily round every tensor the export stores in `dtype` (all but the quantized weights).

    Inside the block the fake-quantized model computes what the exported model computes, so the
    run's final perplexity is the deployed model's and not that of a float32 model nobody ships.
    The original values are restored on exit.
    """
    quantized = {n for n, m in model.named_modules() if isinstance(m, FakeQuantLinear)}
    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    seen: set[int] = set()
    for key, value in model.state_dict(keep_vars=True).items():
        owner, _, leaf = key.rpartition(".")
        if (owner in quantized and leaf == "weight") or ".weight_fake_quant." in key \
                or ".input_fake_quant." in key or not value.is_floating_point():
            continue
        if value.data_ptr() in seen or value.dtype == dtype:
            continue
        seen.add(value.data_ptr())
        saved.append((value, value.detach().clone()))
        with torch.no_grad():
            value.copy_(value.detach().to(dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for value, original in saved:
                value.copy_(original)


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
