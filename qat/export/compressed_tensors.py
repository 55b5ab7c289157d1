"""Write and read the compressed-tensors `pack-quantized` format (what vLLM loads).

Every quantized Linear `P` becomes `P.weight_packed` (int32), `P.weight_scale` (bf16),
`P.weight_shape` (int64) and, when asymmetric, `P.weight_zero_point` (int32, packed along dim 0);
everything else is stored in bf16; config.json's schema is qat.format.schema. Facts:
../shared/formats/compressed-tensors.md.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from qat.format.pack import pack_zero_points
from qat.kernels import QuantizedLinear
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import WeightSpec
from qat.models.experts import checkpoint_module, checkpoint_name
from qat.models.structure import stored_transposed


def stored_tensors(served: nn.Module, dtype: torch.dtype = torch.bfloat16
                   ) -> tuple[dict[str, torch.Tensor], dict[str, WeightSpec], list[str]]:
    """The tensors to store of a converted model (`qat.export.convert`), the scheme of each
    quantized Linear, and the Linears kept in float, named as the model's checkpoints name them."""
    tensors: dict[str, torch.Tensor] = {}
    specs: dict[str, WeightSpec] = {}
    quantized = {n: m for n, m in served.named_modules() if isinstance(m, QuantizedLinear)}
    for name, layer in quantized.items():
        spec = specs[name] = layer.weight_spec
        scale, zp = layer.weight_scale.to(torch.bfloat16), layer.weight_zero_point
        if spec.granularity == "tensor":  # served per-channel, stored as one value
            scale = scale[:1, :1].reshape(1)
            zp = zp[:1, :1].reshape(1) if zp is not None else None
        tensors[f"{name}.weight_packed"] = layer.weight_packed
        tensors[f"{name}.weight_scale"] = scale
        tensors[f"{name}.weight_shape"] = layer.weight_shape
        if zp is not None:
            tensors[f"{name}.weight_zero_point"] = zp.to(torch.int32) \
                if spec.granularity == "tensor" else pack_zero_points(zp.to(torch.int32), spec.bits)
        if layer.bias is not None:
            tensors[f"{name}.bias"] = layer.bias.to(dtype)
    # float Linears made from a Conv1D go back to the (in, out) layout the model's class reads
    transposed = {f"{n}.weight" for n, m in served.named_modules()
                  if n not in quantized and stored_transposed(m)}
    seen: dict[int, str] = {}
    for key, value in served.state_dict(keep_vars=False).items():
        if key.rpartition(".")[0] in quantized:
            continue
        if value.data_ptr() in seen and getattr(served.config, "tie_word_embeddings", False):
            continue  # tied lm_head: transformers re-ties it on load
        seen[value.data_ptr()] = key
        if key in transposed:
            value = value.t()
        tensors[key] = value.detach().to(dtype) if value.is_floating_point() else value
    ignore = [n for n, m in served.named_modules() if isinstance(m, nn.Linear)
              and not stored_transposed(m)]
    # MoE experts and routers under the names the family's checkpoints give them
    config = served.config
    return ({checkpoint_name(config, k): v.contiguous() for k, v in tensors.items()},
            {checkpoint_module(config, n): s for n, s in specs.items()},
            [checkpoint_module(config, n) for n in ignore])


def _storage(t: torch.Tensor) -> int:
    """Where a tensor's elements are: for an FSDP2-sharded (DTensor) one, its local shard's (a
    DTensor wrapper has no storage of its own, so every one would look the same)."""
    local = getattr(t, "to_local", None)
    return (local() if local is not None else t).data_ptr()


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
        if (owner in quantized and leaf != "bias") or ".weight_fake_quant." in key \
                or ".input_fake_quant." in key or not value.is_floating_point():
            continue
        where = _storage(value)
        if where in seen or value.dtype == dtype:
            continue
        seen.add(where)
        saved.append((value, value.detach().clone()))
        with torch.no_grad():
            value.copy_(value.detach().to(dtype))
    try:
        yield model
    finally:
        with torch.no_grad():
            for value, original in saved:
                value.copy_(original)
