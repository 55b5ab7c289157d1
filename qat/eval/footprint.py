"""Weight memory at each bit width: the familiar params * bits / 8, and what an export really stores.

The naive figure forgets that every group of weights carries a bf16 scale (and, asymmetric, a packed
integer zero point) and that embeddings, an untied lm_head and norms stay in bf16. The exact figures
below count the tensors compressed-tensors `pack-quantized` writes (../shared/formats/
compressed-tensors.md), per quantized Linear `P`:

    P.weight_packed      int32 (out, ceil(in * b / 32))
    P.weight_scale       bf16  (out, in / group_size) | (out, 1) per channel | (1,) per tensor
    P.weight_zero_point  int32 (ceil(out * b / 32), n_groups), asymmetric only, packed along dim 0
    P.weight_shape       int64 (2,)

and every other parameter (biases included) once, in the export dtype. Shapes come from config.json
alone: the model is built on the meta device, so nothing is allocated or downloaded.
"""
from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from qat.quant.spec import WeightSpec

NAIVE_FORMATS = (("FP32", 32), ("BF16", 16), ("INT8", 8), ("INT4", 4), ("INT3", 3), ("INT2", 2))
QUANT_BITS = (8, 4, 3, 2)
WORD_BYTES = 4  # packed codes and packed zero points are int32 words
SHAPE_BYTES = 16  # weight_shape: two int64
SCALE_BYTES = 2  # the exporter stores scales in bf16 whatever the model dtype
KINDS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "float")
GB, GIB = 1e9, 2**30
SAFETENSORS_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                        "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class LinearShape:
    """A Linear the recipe would quantize: `weight` is (out_features, in_features)."""

    name: str
    out_features: int
    in_features: int


@dataclass(frozen=True)
class ModelShapes:
    """What the byte count needs: the quantizable Linears and the unique parameter count."""

    linears: tuple[LinearShape, ...]
    total_params: int  # unique parameters: a tied embedding / lm_head counts once

    @property
    def linear_params(self) -> int:
        return sum(l.out_features * l.in_features for l in self.linears)


def naive_bytes(params: float, bits: float) -> float:
    """params * bits / 8: what everyone quotes (70e9 at 4 bits: 35e9 bytes)."""
    return params * bits / 8


def _groups(layer: LinearShape, spec: WeightSpec) -> int:
    """Scales per row; a group that does not tile the row is an error (vLLM refuses it too)."""
    if spec.granularity == "channel":
        return 1
    gs = spec.group_size
    if layer.in_features % gs:
        raise ValueError(f"layer {layer.name!r}: in_features={layer.in_features} is not a multiple "
                         f"of group_size={gs}; choose a group size that divides it or per-channel")
    return layer.in_features // gs


def layer_bytes(layer: LinearShape, spec: WeightSpec) -> dict[str, int]:
    """Stored bytes of one quantized Linear's weight, by tensor kind (bias not included).

    Raises:
        ValueError: group size does not divide in_features (the message names the layer).
    """
    out_f, in_f, bits = layer.out_features, layer.in_features, spec.bits
    packed = out_f * math.ceil(in_f * bits / 32) * WORD_BYTES
    if spec.granularity == "tensor":
        scales, zp = SCALE_BYTES, WORD_BYTES  # one bf16 scale, one int32 zero point
    else:
        groups = _groups(layer, spec)
        scales = out_f * groups * SCALE_BYTES
        zp = math.ceil(out_f * bits / 32) * groups * WORD_BYTES
    return {"weight_packed": packed, "weight_scale": scales,
            "weight_zero_point": 0 if spec.symmetric else zp, "weight_shape": SHAPE_BYTES}


def model_bytes(shapes: ModelShapes, specs: WeightSpec | Mapping[str, WeightSpec],
                float_bytes: int = 2) -> dict[str, int]:
    """Stored bytes of a whole quantized model, by kind, plus "total".

    Args:
        shapes: the model's quantizable Linears and parameter count.
        specs: one scheme for every Linear in `shapes`, or a per-layer mapping (layers it omits
            stay in float).
        float_bytes: bytes per parameter of everything not quantized (2: bf16).
    """
    if isinstance(specs, WeightSpec):
        specs = {l.name: specs for l in shapes.linears}
    totals = dict.fromkeys(KINDS, 0)
    quantized_params = 0
    for layer in shapes.linears:
        if layer.name in specs:
            for kind, n in layer_bytes(layer, specs[layer.name]).items():
                totals[kind] += n
            quantized_params += layer.out_features * layer.in_features
    totals["float"] = (shapes.total_params - quantized_params) * float_bytes
    totals["total"] = sum(totals[k] for k in KINDS)
    return totals


def estimated_bits_per_weight(spec: WeightSpec, in_features: int | None = None) -> float:
    """Bits per quantized weight with scale (16/group) and zero-point (bits/group) overhead.

    Exact for group scales; per-channel needs `in_features` (one scale per row), else its
    overhead (16/in_features bits, under 0.1 for rows of 256+) is left out.
    """
    per_scale = spec.group_size if spec.granularity == "group" else in_features
    if not per_scale:
        return float(spec.bits)
    return spec.bits + (SCALE_BYTES * 8 + (0 if spec.symmetric else spec.bits)) / per_scale


def scheme_grid(group_size: int | None) -> list[tuple[str, WeightSpec]]:
    """The integer schemes the tables list: INT8/4/3/2, symmetric and asymmetric."""
    gran = "group" if group_size else "channel"
    label = f"g{group_size}" if group_size else "per-channel"
    return [(f"INT{b} {label} {'sym' if sym else 'asym'}",
             WeightSpec(bits=b, granularity=gran, group_size=group_size, symmetric=sym))
            for b in QUANT_BITS for sym in (True, False)]


# ---- shapes from a model name or directory, on the meta device --------------------------------------

def shapes_from_model(model, include: tuple[str, ...] | None = None,
                      exclude: tuple[str, ...] | None = None) -> ModelShapes:
    """Quantizable Linears (the recipe defaults: decoder Linears, not lm_head or embeddings)."""

    from qat.quant.spec import QuantConfig
    from qat.models.structure import features, is_projection
    from qat.quant.swap import include_patterns, matches

    defaults = QuantConfig()
    include = include_patterns(model, defaults.include if include is None else include)
    exclude = defaults.exclude if exclude is None else exclude
    linears = tuple(LinearShape(n, *reversed(features(m)))
                    for n, m in model.named_modules() if is_projection(m)
                    and any(matches(n, p) for p in include) and not any(matches(n, p) for p in exclude))
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    return ModelShapes(linears=linears, total_params=total)


def meta_model(config):
    """The model `config` describes, built on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    if hasattr(config, "quantization_config"):
        del config.quantization_config  # describe the float architecture; we count the packing
    from qat.models.experts import unfuse

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    unfuse(model)  # MoE experts as the Linears a run quantizes
    return model


def model_config(source: str):
    """HF config of a model dir, a builtin name ("smollm2-135m"/"smollm2") or a hub id."""
    from transformers import AutoConfig

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; expected a Hugging Face model dir")
        return AutoConfig.from_pretrained(str(path))
    if source in ("smollm2", "smollm2-135m"):
        from qat.assets import cache_dir, locate_package_file
        from qat.models.load import SMOLLM2_CACHE_NAME, SMOLLM2_GGUF

        cached = cache_dir() / "models" / SMOLLM2_CACHE_NAME
        if (cached / "config.json").is_file():
            return AutoConfig.from_pretrained(str(cached))
        gguf = locate_package_file(*SMOLLM2_GGUF)  # the header alone: no dequantization
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    return AutoConfig.from_pretrained(source)


def model_shapes(source) -> ModelShapes:
    """Shapes of a model dir, builtin name, hub id or `qat.models.ModelSpec`, via the meta device."""
    import torch

    from qat.models import ModelSpec, load_model

    if isinstance(source, str) and source == "tiny":
        source = ModelSpec(name="tiny")
    if isinstance(source, ModelSpec):
        if source.name == "tiny" and source.path is None:  # no config.json: its widths are the spec
            with torch.device("meta"):
                return shapes_from_model(load_model(source)[0])
        source = source.path or source.name
    return shapes_from_model(meta_model(model_config(source)))


# ---- an export directory: measured tensor bytes beside the prediction ----------------------------

def tensor_kind(key: str) -> str:
    leaf = key.rpartition(".")[2]
    return leaf if leaf in KINDS else "float"


def safetensors_bytes(path: str | Path) -> dict[str, int]:
    """nbytes of every tensor in a safetensors file, summed by kind, from its header alone."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    totals = dict.fromkeys(KINDS, 0)
    for key, info in header.items():
        if key == "__metadata__":
            continue
        start, end = info["data_offsets"]
        numel = math.prod(info["shape"])
        if end - start != numel * SAFETENSORS_ITEMSIZE.get(info["dtype"], end - start):
            raise ValueError(f"{path}: tensor {key!r} spans {end - start} bytes, not its shape's")
        totals[tensor_kind(key)] += end - start
    totals["total"] = sum(totals[k] for k in KINDS)
    return totals


def export_footprint(directory: str | Path) -> dict:
    """Measured and predicted bytes of an export, by kind, with its schemes.

    Returns:
        {"measured": {...}, "predicted": {...}, "file_bytes": int, "schemes": {scheme: n_layers},
         "float_dtype": str}
    """
    from transformers import AutoConfig

    from qat.export.load import layer_specs
    from qat.format.schema import read_config
    from qat.format.shards import weight_files

    directory = Path(directory)
    raw = read_config(directory)
    dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16")
    float_bytes = {"float32": 4, "float16": 2, "bfloat16": 2}[dtype]
    model = meta_model(AutoConfig.from_pretrained(str(directory)))
    specs = layer_specs(model, raw["quantization_config"], str(directory / "config.json"))
    shapes = shapes_from_model(model, include=("*",), exclude=())
    schemes: dict[str, int] = {}
    for spec in specs.values():
        schemes[spec.describe()] = schemes.get(spec.describe(), 0) + 1
    files = weight_files(directory)
    measured = dict.fromkeys([*KINDS, "total"], 0)
    for path in files:
        for kind, size in safetensors_bytes(path).items():
            measured[kind] += size
    return {"measured": measured, "predicted": model_bytes(shapes, specs, float_bytes),
            "file_bytes": sum(p.stat().st_size for p in files), "schemes": schemes,
            "float_dtype": dtype}
