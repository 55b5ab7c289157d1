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
    groups.append(ScaleGroup(f"{prefix}.gate_up", _get(block, "post_attention_layernorm", prefix),
                             linears("mlp.gate_proj", "mlp.up_proj")))
    groups.append(ScaleGroup(f"{prefix}.down", _get(block, "mlp.up_proj", prefix),
                             linears("mlp.down_proj")))
    return groups


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


def rescale_stats(group: ScaleGroup, stats: dict, s: torch.Tensor) -> None:
    """After `apply_scale`, the group's inputs are x / s: update each distinct InputStats once
    (q/k/v usually share one object)."""
    for obj in {id(stats[n]): stats[n] for n in group.linears}.values():
        obj.rescale(s)


def check_foldable(model: nn.Module, method: str) -> None:
    """Raise before any work unless AWQ/SmoothQuant's folds keep this model's function.

    Checked, not assumed from names: a copy of the first block gets random scales folded into its
    groups and must compute what it computed before, on a few tokens (Gemma's norms scale by
    1 + weight and its post-attention norm sits after the attention: the names fit, the fold
    would not)."""
    from qat.models.blocks import capture_block_inputs, fake_quant_disabled
    from qat.models.blocks import hidden_of as _hidden
    from qat.models.onload import plain_copy
    from qat.models.structure import decoder_blocks

    kind = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    prefix, blocks = decoder_blocks(model)
    block = plain_copy(blocks[0]).float()  # float32: the check sees the fold, not rounding
    try:
        groups = llama_scale_groups(block, f"{prefix}.0")
    except ValueError as err:
        raise ValueError(f"quant.init={method} is not supported for {kind}: {err}") from None
    ids = torch.arange(3, 11, device=next(model.parameters()).device)[None]  # (1, 8)
    first = capture_block_inputs(model, blocks, ids, 1)[0]
    args, kwargs = first.calls[0]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad(), fake_quant_disabled(block):
        want = _hidden(block(first.hidden.float(), *args, **kwargs))
        for group in groups:
            n = next(iter(group.linears.values())).weight.shape[1]
            apply_scale(group, 0.5 + torch.rand(n, generator=generator).to(want.device))
        got = _hidden(block(first.hidden.float(), *args, **kwargs))
    error = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
    if not error < 1e-3:
        raise ValueError(f"quant.init={method} is not supported for {kind}: folding scales into "
                         f"its blocks changes their output (relative error {error:.2g}); scale "
                         "folding supports Llama-style blocks whose norms scale linearly "
                         "(input_layernorm -> q/k/v, post_attention_layernorm -> gate/up)")
