"""`convert(model)`: a fake-quantized model becomes the served model, in memory (torchao's
prepare -> train -> convert).

Every `FakeQuantLinear` becomes a `QuantizedLinear` holding the very codes, scales and zero points
its forward pass used (packed as the export stores them); every other parameter and persistent
buffer is cast to the export's dtype. The result is what `load_quantized` builds from the files, so
the exporter writes it and a run evaluates it without a disk round trip; re-reading the files stays
as the check.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from qat.format.pack import pack, pack_zero_points, unpack_zero_points
from qat.kernels import QuantizedLinear
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import WeightSpec
from qat.quant.structure import TRANSPOSED, source_class, stored_transposed


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


def serving_linear(weight_packed: torch.Tensor, weight_scale: torch.Tensor,
                   weight_zero_point: torch.Tensor | None, spec: WeightSpec, in_features: int,
                   bias: torch.Tensor | None, backend: str = "auto") -> QuantizedLinear:
    """The served layer from its stored tensors (zero points packed as stored, or None), as both
    `convert` and `load_quantized` build it. `weight_spec` rides along for the exporter."""
    out_features = weight_packed.shape[0]
    if spec.granularity == "tensor":  # one scale (and zero point): served as per-channel
        weight_scale = weight_scale.reshape(1, 1).expand(out_features, 1).contiguous()
    zero_point = None
    if weight_zero_point is not None:
        zero_point = weight_zero_point.reshape(1, 1).expand(out_features, 1).contiguous() \
            if spec.granularity == "tensor" \
            else unpack_zero_points(weight_zero_point, spec.bits, out_features)
    layer = QuantizedLinear(weight_packed, weight_scale, zero_point, in_features, spec.bits,
                            spec.effective_group_size, bias)
    if backend == "reference":  # float32 scales (exact copies) keep the layer off the kernels
        layer.weight_scale = layer.weight_scale.float()
    layer.backend = backend
    layer.weight_spec = spec
    return layer


def convert(model: nn.Module, dtype: torch.dtype = torch.bfloat16, backend: str = "auto",
            inplace: bool = False) -> nn.Module:
    """The served model of a fake-quantized `model` (a copy unless `inplace`), in eval mode.

    Args:
        dtype: of everything not quantized (embeddings, norms, biases), as the export stores it.
        backend: the QuantizedLinear kernels, as in `load_quantized` ("reference": float32 math).
    """
    if not any(isinstance(m, FakeQuantLinear) for m in model.modules()):
        raise ValueError("convert: the model has no fake-quantized Linear; run qat.quant.prepare "
                         "first")
    model = model if inplace else copy.deepcopy(model)
    for name, module in list(model.named_modules()):
        if not isinstance(module, FakeQuantLinear):
            continue
        with torch.no_grad():
            packed = pack_layer(module)
        bias = module.bias.detach().to(dtype) if module.bias is not None else None
        layer = serving_linear(packed.weight_packed, packed.weight_scale, packed.weight_zero_point,
                               module.weight_fake_quant.spec, module.in_features, bias, backend)
        layer.source_class = source_class(module)
        if stored_transposed(module):
            setattr(layer, TRANSPOSED, True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
    cast_float_tensors(model, dtype)
    return model.eval()


def cast_float_tensors(model: nn.Module, dtype: torch.dtype) -> None:
    """Parameters and persistent buffers outside the quantized layers to `dtype`, in place (tied
    parameters stay one tensor); non-persistent buffers (rotary tables) keep the dtype the model's
    constructor gave them, as in a loaded export."""
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            continue
        for param in module.parameters(recurse=False):
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        for key, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.is_floating_point() \
                    and key not in module._non_persistent_buffers_set:
                setattr(module, key, buffer.to(dtype))
