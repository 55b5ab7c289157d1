"""`convert(model)`: a fake-quantized model becomes the served model, in memory (torchao's
prepare -> train -> convert).

Every `FakeQuantLinear` becomes a `QuantizedLinear` holding the very codes, scales and zero points
its forward pass used (codes packed as the export stores them); every other parameter and persistent
buffer is cast to the export's dtype. The result is what `load_quantized` builds from the files, so
the exporter writes it and a run evaluates it without a disk round trip; re-reading the files stays
as the check.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.io import release_memory
from qat.kernels import QuantizedLinear
from qat.quant.modules import FakeQuantLinear
from qat.quant.spec import WeightSpec
from qat.models.structure import TRANSPOSED, source_class, stored_transposed


def serve_as(layer: QuantizedLinear, spec: WeightSpec, backend: str = "auto") -> QuantizedLinear:
    """Set a built layer up for serving, as both `convert` and `load_quantized` do: its backend
    (reference: float32 scales, exact copies, keep it off the kernels) and the `weight_spec` the
    exporter writes."""
    if backend == "reference":
        layer.weight_scale = layer.weight_scale.float()
    layer.backend = backend
    layer.weight_spec = spec
    return layer


def _quantized_linear(module: FakeQuantLinear, dtype: torch.dtype, backend: str) -> QuantizedLinear:
    """The codes, scales and zero points exactly as the fake quantizer's forward pass uses them."""
    spec = module.weight_fake_quant.spec
    with torch.no_grad():
        q, scale, zp = module.weight_fake_quant.quantized(module.weight_like())  # (out, in), (rows, G)
    if spec.granularity == "tensor":  # one scale (and zero point): served as per-channel
        scale, zp = (t.reshape(1, 1).expand(module.out_features, 1) for t in (scale, zp))
    bias = module.bias.detach().to(dtype) if module.bias is not None else None
    layer = QuantizedLinear.from_quantized(q, scale.to(torch.bfloat16).contiguous(),
                                           None if spec.symmetric else zp, spec.bits,
                                           spec.effective_group_size, bias)
    return serve_as(layer, spec, backend)


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
    # names, not modules: a list of the modules would keep every replaced layer's codes alive
    # until the loop ends (a second model's worth of memory)
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name in names:
        module = model.get_submodule(name)
        layer = _quantized_linear(module, dtype, backend)
        layer.source_class = source_class(module)
        if stored_transposed(module):
            setattr(layer, TRANSPOSED, True)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        del module, layer
        if inplace:
            release_memory()  # the layer's codes and temporaries: no holes left behind
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


def served_from_checkpoint(path: str | Path, dtype: torch.dtype = torch.bfloat16,
                           backend: str = "auto") -> tuple[nn.Module, Any, dict[str, Any]]:
    """(served model, tokenizer, run config): what `convert` makes of model_from_checkpoint's
    model, built a decoder block at a time: each block's float tensors are read, converted to
    codes and dropped before the next is read, so the float model is never whole in memory (a
    distributed checkpoint is read tensor by tensor; a one-file checkpoint is mapped)."""
    from qat.models.checkpoint import (CheckpointTensors, check_filled, fill, read_checkpoint,
                                       skeleton)
    from qat.models.structure import decoder_blocks

    path = Path(path)
    ckpt = read_checkpoint(path, tensors=False)
    model, tokenizer = skeleton(ckpt["qat"]["config"])
    tensors = CheckpointTensors(path, ckpt if "state_dict" in ckpt else None)
    prefix, blocks = decoder_blocks(model)
    missing, unexpected = [], []
    for index, block in enumerate(blocks):
        found = fill(block, tensors, f"{prefix}.{index}.")
        missing, unexpected = missing + found[0], unexpected + found[1]
        if any(isinstance(m, FakeQuantLinear) for m in block.modules()):
            convert(block, dtype, backend, inplace=True)
        else:
            cast_float_tensors(block, dtype)
    found = fill(model, tensors, "", [n for n in tensors.names()
                                       if not n.startswith(prefix + ".")])
    missing += [n for n in found[0] if not n.startswith(prefix + ".")]
    check_filled(model, path, missing, unexpected + found[1])
    if any(isinstance(m, FakeQuantLinear) for m in model.modules()):  # a quantized head
        convert(model, dtype, backend, inplace=True)
    cast_float_tensors(model, dtype)
    return model.eval(), tokenizer, ckpt["qat"]["config"]
