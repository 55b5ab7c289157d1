"""Per-input-channel scale folding for Llama-style blocks (AWQ, SmoothQuant).

For a channel scale s, the Linears reading a hidden vector get W[:, j] * s_j while whatever produced
that vector divides its channel j by s_j, so the float function is unchanged and only the split of
magnitude between activations and weights moves.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class ScaleGroup:
    """Linears that read the same hidden vector, and the module that writes it."""

    name: str  # e.g. "model.layers.0.qkv"
    prev: nn.Module  # RMSNorm (1-d weight) or Linear (its output rows are divided by s)
    linears: dict[str, nn.Linear]  # full name -> Linear, all fed prev's output


def _get(block: nn.Module, path: str, prefix: str) -> nn.Module:
    try:
        return block.get_submodule(path)
    except AttributeError as err:
        raise ValueError(f"ptq: {prefix} has no {path}; scale folding supports Llama-style blocks "
                         "(input_layernorm, self_attn.{q,k,v,o}_proj, post_attention_layernorm, "
                         "mlp.{gate,up,down}_proj)") from err


def llama_scale_groups(block: nn.Module, prefix: str) -> list[ScaleGroup]:
    """The four foldable groups of a Llama block, in the order AWQ searches them.

    v -> o is left out under grouped-query attention: one v channel feeds several heads' o
    channels, so o's columns cannot take independent scales.
    """
    def linears(*paths: str) -> dict[str, nn.Linear]:
        return {f"{prefix}.{p}": _get(block, p, prefix) for p in paths}

    v, o = _get(block, "self_attn.v_proj", prefix), _get(block, "self_attn.o_proj", prefix)
    groups = [ScaleGroup(f"{prefix}.qkv", _get(block, "input_layernorm", prefix),
                         linears("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))]
    if v.out_features == o.in_features:
        groups.append(ScaleGroup(f"{prefix}.vo", v, linears("self_attn.o_proj")))
    norm = _get(block, "post_attention_layernorm", prefix)
    moe = moe_path(block)
    if moe is not None:
        return groups + moe_scale_groups(block.get_submodule(moe), f"{prefix}.{moe}", norm)
    groups.append(ScaleGroup(f"{prefix}.gate_up", norm, linears("mlp.gate_proj", "mlp.up_proj")))
    groups.append(ScaleGroup(f"{prefix}.down", _get(block, "mlp.up_proj", prefix),
                             linears("mlp.down_proj")))
    return groups


MOE_PATHS = ("mlp", "block_sparse_moe")  # where a block keeps its MoE layer (after unfusing)


def moe_path(block: nn.Module) -> str | None:
    """The child of `block` that is an MoE layer (holds an `experts` list), or None."""
    return next((p for p in MOE_PATHS
                 if isinstance(getattr(getattr(block, p, None), "experts", None), nn.ModuleList)),
                None)
GATED = ("gate_proj", "up_proj", "down_proj")  # a shared expert's MLP


def moe_scale_groups(moe: nn.Module, prefix: str, norm: nn.Module) -> list[ScaleGroup]:
    """An MoE layer's foldable groups: the norm feeds every expert's gate and up projections,
    the shared expert's and the router (a float reader whose columns take the scale too, so the
    routing is unchanged); then each expert's up feeds its own down. One scale for all experts'
    inputs, as the norm is one (llm-compressor's AWQ mappings for Mixtral do the same)."""
    readers: dict[str, nn.Module] = {}
    downs: list[ScaleGroup] = []
    for index, expert in enumerate(moe.experts):
        gate, up, down = expert.names
        at = f"{prefix}.experts.{index}"
        readers.update({f"{at}.{gate}": getattr(expert, gate), f"{at}.{up}": getattr(expert, up)})
        downs.append(ScaleGroup(f"{at}.down", getattr(expert, up),
                                {f"{at}.{down}": getattr(expert, down)}))
    for name, child in moe.named_children():
        if child is moe.experts:
            continue
        if all(isinstance(getattr(child, n, None), nn.Linear) for n in GATED):  # shared expert
            readers.update({f"{prefix}.{name}.{n}": getattr(child, n) for n in GATED[:2]})
            downs.append(ScaleGroup(f"{prefix}.{name}.down", child.up_proj,
                                    {f"{prefix}.{name}.down_proj": child.down_proj}))
        elif getattr(child, "weight", None) is not None and child.weight.ndim == 2:
            readers[f"{prefix}.{name}"] = child  # the router, a shared-expert gate
    return [ScaleGroup(f"{prefix}.gate_up", norm, readers)] + downs


def _assign(param: torch.Tensor, value: torch.Tensor) -> None:
    param.copy_(value.to(param.dtype))


@torch.no_grad()
def apply_scale(group: ScaleGroup, s: torch.Tensor) -> None:
    """Divide prev's output channels by s and multiply the Linears' input columns by s (float32
    arithmetic, stored back in each parameter's dtype)."""
    s = s.float()
    prev = group.prev
    if isinstance(prev, nn.Linear):
        _assign(prev.weight, prev.weight.float() / s[:, None])
    elif prev.weight.ndim == 1:
        _assign(prev.weight, prev.weight.float() / s)
    else:
        raise ValueError(f"ptq: cannot fold a scale into {type(prev).__name__} of {group.name}")
    if getattr(prev, "bias", None) is not None:
        _assign(prev.bias, prev.bias.float() / s)
    for linear in group.linears.values():
        _assign(linear.weight, linear.weight.float() * s[None, :])


def group_stats(group: ScaleGroup, stats: dict) -> list:
    """The distinct input statistics of a group's readers (q/k/v usually share one object; an
    MoE group has one per expert that tokens reached, none for its router)."""
    return list({id(stats[n]): stats[n] for n in group.linears if n in stats}.values())


def rescale_stats(group: ScaleGroup, stats: dict, s: torch.Tensor) -> None:
    """After `apply_scale`, the group's inputs are x / s: update each distinct InputStats once."""
    for obj in group_stats(group, stats):
        obj.rescale(s)


def check_foldable(model: nn.Module, method: str) -> None:
    """Raise before any work unless AWQ/SmoothQuant's folds keep this model's function.

    Checked, not assumed from names: a copy of the first block gets random scales folded into its
    groups and must compute what it computed before, on a few tokens (Gemma's norms scale by
    1 + weight and its post-attention norm sits after the attention: the names fit, the fold
    would not). An MoE model's first MoE block is checked too where the first block is dense."""
    from qat.models.blocks import capture_block_inputs
    from qat.models.structure import decoder_blocks

    kind = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    prefix, blocks = decoder_blocks(model)
    ids = torch.arange(3, 11, device=next(model.parameters()).device)[None]  # (1, 8)
    first = capture_block_inputs(model, blocks, ids, 1)[0]
    # the first block, and the first MoE block where it is another kind (DeepSeek's lead dense)
    kinds = {}
    for index, block in enumerate(blocks):
        kinds.setdefault(moe_path(block) is not None, index)
    for index in sorted(kinds.values()):
        _check_block(blocks[index], f"{prefix}.{index}", first.hidden, first.calls[index], kind,
                     method)


def _check_block(original: nn.Module, prefix: str, hidden: torch.Tensor, call, kind: str,
                 method: str) -> None:
    from qat.models.blocks import fake_quant_disabled
    from qat.models.blocks import hidden_of as _hidden
    from qat.models.onload import plain_copy

    block = plain_copy(original).float()  # float32: the check sees the fold, not rounding
    try:
        groups = llama_scale_groups(block, prefix)
    except ValueError as err:
        raise ValueError(f"quant.init={method} is not supported for {kind}: {err}") from None
    args, kwargs = call
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), fake_quant_disabled(block):
        want = _hidden(block(hidden.float(), *args, **kwargs))
        for group in groups:
            n = next(iter(group.linears.values())).weight.shape[1]
            apply_scale(group, 0.5 + torch.rand(n, generator=generator).to(want.device))
        got = _hidden(block(hidden.float(), *args, **kwargs))
    error = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    if not error < 1e-3:
        raise ValueError(f"quant.init={method} is not supported for {kind}: folding scales into "
                         f"its blocks changes their output (relative error {error:.2g}); scale "
                         "folding supports Llama-style blocks whose norms scale linearly "
                         "(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up)")
