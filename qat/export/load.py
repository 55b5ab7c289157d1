"""`load_quantized(DIR)`: a compressed-tensors export as a model whose Linears hold packed integers.

The quantized Linears become `qat.kernels.QuantizedLinear` (fused kernels: Triton on GPU, torch's
weight-only int4/int8 kernels on CPU, a dequantize fallback otherwise); nothing is dequantized into a
float weight, so the parameter memory really shrinks.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qat.export.convert import serve_as
from qat.format.pack import packed_words, unpack_zero_points
from qat.format.schema import read_config, scheme_from_args
from qat.format.shards import INDEX_FILE, WEIGHTS_FILE, weight_files, weight_map
from qat.kernels import QuantizedLinear
from qat.quant.spec import WeightSpec
from qat.models.experts import checkpoint_module, checkpoint_name, unfuse
from qat.models.structure import features, is_projection, source_class


def _matches(name: str, module: nn.Module, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], name) is not None
    return name == target or type(module).__name__ == target


def layer_specs(model: nn.Module, qconfig: dict[str, Any], where: str) -> dict[str, WeightSpec]:
    """Which Linear gets which scheme, resolved as compressed-tensors does (ignore wins)."""
    groups = [(g.get("targets", []),
               WeightSpec.from_scheme(scheme_from_args(g["weights"], f"{where} {name}")))
              for name, g in qconfig.get("config_groups", {}).items() if g.get("weights")]
    ignore = qconfig.get("ignore", [])
    specs = {}
    for name, module in model.named_modules():
        if not is_projection(module):
            continue
        stored = checkpoint_module(model.config, name)  # its name in the files (MoE experts)
        if any(_matches(stored, module, t) for t in ignore):
            continue
        for targets, spec in groups:
            if any(_matches(stored, module, t) for t in targets):
                specs[name] = spec
                break
    return specs


class _Weights:
    """The tensors of a model directory, one file or shards, read by name (safetensors maps each
    file; a tensor is read only when asked for)."""

    def __init__(self, directory: Path) -> None:
        from safetensors import safe_open

        self.files = {}
        for path in weight_files(directory):
            try:
                self.files[path.name] = safe_open(str(path), framework="pt", device="cpu")
            except Exception as err:
                raise ValueError(f"{path}: not a readable safetensors file ({err})") from err
        self.where = {key: name for name, f in self.files.items() for key in f.keys()}
        listed = weight_map(directory)
        if listed and listed != self.where:
            wrong = sorted(k for k in set(listed) | set(self.where) if listed.get(k) != self.where.get(k))
            raise ValueError(f"{directory / INDEX_FILE}: the index and the shards disagree about "
                             f"{len(wrong)} tensor(s), e.g. {wrong[:3]}")

    def keys(self):
        return self.where.keys()

    def get_tensor(self, key: str) -> torch.Tensor:
        return self.files[self.where[key]].get_tensor(key)


def _tensor(f, key: str, path: Path) -> torch.Tensor:
    try:
        return f.get_tensor(key)
    except Exception as err:
        raise ValueError(f"{path}: tensor {key!r} is missing or unreadable ({err})") from err


def _quantized_linear(f, name: str, module: nn.Module, spec: WeightSpec, path: Path,
                      keys: set[str], backend: str) -> QuantizedLinear:
    shape = _tensor(f, f"{name}.weight_shape", path).tolist()
    in_features, out_features = features(module)  # a Conv1D is stored as the Linear it is
    if shape != [out_features, in_features]:
        raise ValueError(f"{path}: tensor '{name}.weight_shape' is {shape} but config.json gives "
                         f"[{out_features}, {in_features}]")
    if f"{name}.weight_g_idx" in keys:
        raise ValueError(f"{path}: tensor '{name}.weight_g_idx' (act-order group permutation) is "
                         "not supported; serving it without would load wrong weights")
    out_f, in_f = shape
    packed = _tensor(f, f"{name}.weight_packed", path)
    if tuple(packed.shape) != (out_f, packed_words(in_f, spec.bits)) or packed.dtype != torch.int32:
        raise ValueError(f"{path}: tensor '{name}.weight_packed' has shape {tuple(packed.shape)} "
                         f"{packed.dtype}; expected ({out_f}, {packed_words(in_f, spec.bits)}) int32")
    scale = _tensor(f, f"{name}.weight_scale", path)
    group_size = spec.effective_group_size
    n_groups = 1 if group_size is None else in_f // group_size
    wrong = scale.numel() != 1 if spec.granularity == "tensor" \
        else tuple(scale.shape) != (out_f, n_groups)
    if wrong:
        raise ValueError(f"{path}: tensor '{name}.weight_scale' has shape {tuple(scale.shape)}; "
                         f"expected {(1,) if spec.granularity == 'tensor' else (out_f, n_groups)}")
    if spec.granularity == "tensor":  # one scale: serve it as per-channel
        scale = scale.reshape(1, 1).expand(out_f, 1).contiguous()
    zero_point = None
    if not spec.symmetric:
        zp = _tensor(f, f"{name}.weight_zero_point", path)
        zero_point = zp.reshape(1, 1).expand(out_f, 1).contiguous() if spec.granularity == "tensor" \
            else unpack_zero_points(zp, spec.bits, out_f)
    bias = _tensor(f, f"{name}.bias", path) if f"{name}.bias" in keys else None
    layer = serve_as(QuantizedLinear(packed, scale, zero_point, in_f, spec.bits, group_size, bias),
                     spec, backend)
    layer.source_class = source_class(module)  # what a re-export targets by name (Conv1D ...)
    return layer


BACKENDS = ("auto", "torch", "reference")


def load_quantized(directory: str | Path, dtype: torch.dtype = torch.bfloat16,
                   device: str | torch.device = "cpu", backend: str = "auto",
                   embedding_bits: int | None = None) -> nn.Module:
    """Load an export written by `qat.export` (or any compressed-tensors pack-quantized model).

    Args:
        directory: the export directory (config.json, model.safetensors, tokenizer files).
        dtype: dtype of the non-quantized parameters (embeddings, norms) and of the activations.
        device: where the model goes.
        backend: "auto" uses the fastest kernels (our CPU GEMV, Triton on CUDA); "torch" torch's
            CPU kernels instead of our GEMV; "reference" dequantizes in float32 on the fly
            (exact, slow: for checking that served equals trained).
        embedding_bits: None keeps the stored embedding/head; 8 holds them as int8 rows
            (`qat.kernels.embedding`: half the bytes of bf16, a serving-time choice).
    Returns:
        The model in eval mode; quantized Linears are `QuantizedLinear` modules.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not allowed; choose one of {list(BACKENDS)}")
    directory = Path(directory)
    config_dict = read_config(directory)
    sharded = (directory / INDEX_FILE).is_file()
    path = directory / (INDEX_FILE if sharded else WEIGHTS_FILE)
    for file in weight_files(directory):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing; the export is incomplete")
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we build the quantized layers ourselves
    with _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    unfuse(model)  # MoE experts as the per-expert Linears the export stores
    specs = layer_specs(model, config_dict["quantization_config"], str(directory / "config.json"))
    f = _Weights(directory)
    keys = set(f.keys())
    for name, spec in specs.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        stored = checkpoint_module(config, name)
        layer = _quantized_linear(f, stored, getattr(parent, child), spec, path, keys, backend)
        setattr(parent, child, layer)
    state = {}
    for key, param in list(model.state_dict(keep_vars=True).items()):
        owner = key.rpartition(".")[0]
        if owner in specs:
            continue
        stored = checkpoint_name(config, key)
        if stored not in keys:
            if key.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False):
                continue
            if param.device.type == "meta" and not key.endswith(("inv_freq", "original_inv_freq")):
                raise ValueError(f"{path}: tensor {key!r} is missing")
            continue
        value = _tensor(f, stored, path)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{path}: tensor {key!r} has shape {tuple(value.shape)}; config.json "
                             f"gives {tuple(param.shape)}")
        state[key] = value.to(dtype) if value.is_floating_point() else value
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    _check_complete(model)
    if embedding_bits is not None:
        if embedding_bits != 8:
            raise ValueError(f"embedding_bits={embedding_bits} is not allowed; choose None or 8")
        from qat.kernels.embedding import int8_embeddings

        int8_embeddings(model)
    return model.to(device).eval()


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Build a model with its parameters on the meta device (no memory: the file fills them) but
    its buffers for real: non-persistent buffers (rotary tables, a scaled embedding's scale) are not
    in the file, so they must come out of the model's own constructor."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _check_complete(model: nn.Module) -> None:
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise ValueError(f"export is missing tensors for {leftover[:5]}")


def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by quantized Linear weights, by the rest of the parameters (int8 embedding tables
    included), and in total."""
    from qat.kernels.embedding import Int8Embedding

    quantized = sum(m.weight_bytes() for m in model.modules() if isinstance(m, QuantizedLinear))
    tables = sum(m.weight_bytes() for m in model.modules() if isinstance(m, Int8Embedding))
    seen, other = set(), 0
    for p in list(model.parameters()) + [m.bias for m in model.modules()
                                         if isinstance(m, QuantizedLinear) and m.bias is not None]:
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            other += p.numel() * p.element_size()
    other += tables
    return {"quantized_linear": quantized, "other": other, "total": quantized + other}
