"""Structured pruning: whole KV groups of attention heads, or MLP channels, then really shrinking.

While training, structured pruning is just a mask (rows of q/k/v and columns of o_proj, or rows of
gate/up and columns of down_proj), so the callback treats it like any other mask. `shrink` then cuts
the masked rows and columns out, giving smaller nn.Linear shapes and a config.json that describes them;
the cut model computes exactly what the masked one did, because every removed path was multiplied by
a zero column of o_proj / down_proj.

The same number of groups or channels goes in every layer, since num_key_value_heads and
intermediate_size are single numbers in the config. Blocks are found by their Linear names (q_proj,
k_proj, v_proj, o_proj; gate_proj, up_proj, down_proj), which Llama, Mistral and Qwen share.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ScoreFn = Callable[[str, nn.Linear], torch.Tensor]  # (name, linear) -> (out, in) float scores


def _blocks(model: nn.Module, children: tuple[str, ...]) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules()
            if all(isinstance(getattr(m, c, None), nn.Linear) for c in children)}


def _head_layout(attn: nn.Module) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) of one attention block, read from its Linear shapes."""
    head_dim = attn.head_dim
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def _n_remove(sparsity: float, total: int, what: str) -> int:
    n = round(sparsity * total)
    if n >= total:
        raise ValueError(f"prune.sparsity={sparsity} would remove all {total} {what} of a layer; "
                         "choose a smaller sparsity")
    return n


def _keep_lowest_out(group_scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    keep = torch.ones_like(group_scores, dtype=torch.bool)
    if n_remove:
        keep[group_scores.topk(n_remove, largest=False).indices] = False
    return keep


def _row_col_masks(prefix: str, rows: dict[str, nn.Linear], cols: dict[str, nn.Linear],
                   keep_rows: dict[str, torch.Tensor], keep_cols: torch.Tensor
                   ) -> dict[str, torch.Tensor]:
    masks = {f"{prefix}.{c}": keep_rows[c][:, None].expand_as(rows[c].weight).contiguous()
             for c in rows}
    masks.update({f"{prefix}.{c}": keep_cols[None, :].expand_as(lin.weight).contiguous()
                  for c, lin in cols.items()})
    return masks


def head_masks(model: nn.Module, sparsity: float, score: ScoreFn) -> dict[str, torch.Tensor]:
    """Masks removing the same number of KV groups (a kv head with its query heads) per layer.

    A group's score is the sum of its weights' scores in q, k, v (rows) and o_proj (columns).
    """
    masks = {}
    for prefix, attn in _blocks(model, ATTENTION).items():
        n_heads, n_kv, head_dim = _head_layout(attn)
        per_group = n_heads // n_kv * head_dim  # query rows per kv group
        s = {c: score(f"{prefix}.{c}", getattr(attn, c)) for c in ATTENTION}
        group = (s["q_proj"].sum(1).view(n_kv, per_group).sum(1)
                 + s["k_proj"].sum(1).view(n_kv, head_dim).sum(1)
                 + s["v_proj"].sum(1).view(n_kv, head_dim).sum(1)
                 + s["o_proj"].sum(0).view(n_kv, per_group).sum(1))  # (n_kv,)
        keep = _keep_lowest_out(group, _n_remove(sparsity, n_kv, "KV head groups"))
        q_rows, kv_rows = keep.repeat_interleave(per_group), keep.repeat_interleave(head_dim)
        masks.update(_row_col_masks(
            prefix, {c: getattr(attn, c) for c in ATTENTION[:3]}, {"o_proj": attn.o_proj},
            {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows}, q_rows))
    return masks


def channel_masks(model: nn.Module, sparsity: float, score: ScoreFn) -> dict[str, torch.Tensor]:
    """Masks removing the same number of MLP intermediate channels per layer.

    A channel's score is the sum over its gate and up rows and its down_proj column.
    """
    masks = {}
    for prefix, mlp in _blocks(model, MLP).items():
        s = {c: score(f"{prefix}.{c}", getattr(mlp, c)) for c in MLP}
        channel = s["gate_proj"].sum(1) + s["up_proj"].sum(1) + s["down_proj"].sum(0)
        keep = _keep_lowest_out(channel, _n_remove(sparsity, channel.numel(), "MLP channels"))
        masks.update(_row_col_masks(prefix, {"gate_proj": mlp.gate_proj, "up_proj": mlp.up_proj},
                                    {"down_proj": mlp.down_proj},
                                    {"gate_proj": keep, "up_proj": keep}, keep))
    return masks


def _check_plain(linear: nn.Linear) -> None:
    if type(linear) is not nn.Linear:
        raise ValueError(f"cannot shrink a {type(linear).__name__}; call qat.quant.unprepare(model) "
                         "first so every Linear is a plain nn.Linear")


def _slice_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None) -> nn.Linear:
    """A new plain nn.Linear holding only the kept rows (outputs) and columns (inputs)."""
    _check_plain(linear)
    w = linear.weight.detach()
    w = w[rows] if rows is not None else w
    w = w[:, cols] if cols is not None else w
    bias = linear.bias
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w.clone(), requires_grad=linear.weight.requires_grad)
    if bias is not None:
        b = bias.detach()[rows] if rows is not None else bias.detach()
        new.bias = nn.Parameter(b.clone(), requires_grad=bias.requires_grad)
    return new


def _uniform(counts: list[int], what: str) -> int:
    if len(set(counts)) > 1:
        raise ValueError(f"layers keep different numbers of {what} ({sorted(set(counts))}); "
                         "config.json needs the same count in every layer")
    return counts[0]


def _attention_plan(model: nn.Module, masks) -> dict:
    """{prefix: (attn, kept KV groups (n_kv,) bool, head_dim, query heads per group)}."""
    plan = {}
    for prefix, attn in _blocks(model, ATTENTION).items():
        if f"{prefix}.o_proj" in masks:
            n_heads, n_kv, head_dim = _head_layout(attn)
            heads = masks[f"{prefix}.o_proj"].any(0).view(n_heads, head_dim).any(1).cpu()
            plan[prefix] = (attn, heads.view(n_kv, n_heads // n_kv).any(1), head_dim,
                            n_heads // n_kv)
    return plan


def _shrink_attention(plan: dict) -> dict[str, int]:
    kv = _uniform([int(g.sum()) for _, g, _, _ in plan.values()], "KV head groups")
    for attn, groups, head_dim, ratio in plan.values():
        q_rows = groups.repeat_interleave(ratio * head_dim).nonzero().squeeze(1)
        kv_rows = groups.repeat_interleave(head_dim).nonzero().squeeze(1)
        attn.q_proj = _slice_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _slice_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _slice_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _slice_linear(attn.o_proj, cols=q_rows)
    _, _, head_dim, ratio = next(iter(plan.values()))
    return {"num_attention_heads": kv * ratio, "num_key_value_heads": kv, "head_dim": head_dim}


def _mlp_plan(model: nn.Module, masks) -> dict:
    """{prefix: (mlp, kept channels (intermediate,) bool)}."""
    return {prefix: (mlp, masks[f"{prefix}.down_proj"].any(0).cpu())
            for prefix, mlp in _blocks(model, MLP).items() if f"{prefix}.down_proj" in masks}


def _shrink_mlp(plan: dict) -> dict[str, int]:
    size = _uniform([int(k.sum()) for _, k in plan.values()], "MLP channels")
    for mlp, keep in plan.values():
        idx = keep.nonzero().squeeze(1)
        mlp.gate_proj = _slice_linear(mlp.gate_proj, rows=idx)
        mlp.up_proj = _slice_linear(mlp.up_proj, rows=idx)
        mlp.down_proj = _slice_linear(mlp.down_proj, cols=idx)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = size
    return {"intermediate_size": size}


@torch.no_grad()
def shrink(model: nn.Module, masks: dict[str, torch.Tensor]) -> dict:
    """Cut masked heads / channels out of `model` in place and update `model.config`.

    Heads follow the o_proj masks (a KV group goes when all its query heads are masked), channels
    follow the down_proj masks; blocks without such a mask are left alone. Everything is checked
    before the model is touched. Returns the config fields changed and the parameter counts.
    """
    attention, mlp = _attention_plan(model, masks), _mlp_plan(model, masks)
    if attention:
        _uniform([int(g.sum()) for _, g, _, _ in attention.values()], "KV head groups")
    if mlp:
        _uniform([int(k.sum()) for _, k in mlp.values()], "MLP channels")
    blocks = [(a, ATTENTION) for a, *_ in attention.values()] + [(m, MLP) for m, _ in mlp.values()]
    for block, children in blocks:
        for child in children:
            _check_plain(getattr(block, child))
    before = sum(p.numel() for p in model.parameters())
    changed = _shrink_attention(attention) if attention else {}
    changed.update(_shrink_mlp(mlp) if mlp else {})
    for key, value in changed.items():
        setattr(model.config, key, value)
    return {"config": changed, "parameters_before": before,
            "parameters_after": sum(p.numel() for p in model.parameters())}


def check_structured(model: nn.Module, pattern: str) -> None:
    """Raise before any work unless every decoder block has the projections `pattern` cuts."""
    from qat.models.structure import decoder_blocks

    children = ATTENTION if pattern == "heads" else MLP
    _, blocks = decoder_blocks(model)
    found = sum(len(_blocks(block, children)) for block in blocks)
    kind = f"{type(model).__name__} (model_type {getattr(model.config, 'model_type', '?')!r})"
    if found != len(blocks):
        raise ValueError(f"prune.pattern={pattern!r} is not supported for {kind}: it needs "
                         f"separate nn.Linear {', '.join(children)} in every decoder block "
                         f"(found them in {found} of {len(blocks)})")
    if pattern == "heads" and not _rebuilds_with_fewer_heads(model, blocks[0]):
        raise ValueError(f"prune.pattern='heads' is not supported for {kind}: its attention does "
                         "not take head_dim from the config, so the model with fewer heads cannot "
                         "be rebuilt from its config (export, resume)")


def _rebuilds_with_fewer_heads(model: nn.Module, block: nn.Module) -> bool:
    """Whether the model's class, given the config `shrink` writes (one KV group fewer, head_dim
    kept), builds attention of that shape; checked on the meta device (no memory)."""
    import copy

    from transformers import AutoModelForCausalLM

    from qat.models.structure import decoder_blocks

    n_heads, n_kv, head_dim = _head_layout(next(iter(_blocks(block, ATTENTION).values())))
    if n_kv < 2:
        return True  # nothing can be cut; the sparsity check says so
    kv = n_kv - 1
    config = copy.deepcopy(model.config)
    config.num_attention_heads, config.num_key_value_heads = n_heads // n_kv * kv, kv
    config.head_dim = head_dim
    with torch.device("meta"):
        rebuilt = AutoModelForCausalLM.from_config(config)
    attn = next(iter(_blocks(decoder_blocks(rebuilt)[1][0], ATTENTION).values()))
    return (attn.q_proj.out_features, attn.k_proj.out_features) == \
        (n_heads // n_kv * kv * head_dim, kv * head_dim)
