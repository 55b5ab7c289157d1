"""Lean greedy decoding for Llama-style causal LMs (llama, mistral, qwen2).

Why: at batch 1 on a CPU, Hugging Face `generate` spends ~30 ms per token of SmolLM2-135M outside
the matmuls (measured: the same loop with zero-cost Linears), more than the W4 kernels themselves.
This loop runs the model's own modules (so float, fake-quantized and exported models all work) in
one plain pass per token over the decoder layers, with a preallocated KV cache and no per-step
bookkeeping. Greedy tokens match `generate` (tests/test_decode.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check(model, batch: int) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"qat.decode supports model_type in {list(SUPPORTED)}, got {kind!r}; "
                         "use model.generate")
    if batch != 1:
        raise ValueError(f"qat.decode decodes one sequence (batch 1), got batch {batch}")


@torch.no_grad()
def greedy(model, ids: torch.Tensor, max_new_tokens: int,
           eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy continuation of `ids` (1, T): returns the new token ids, (n,) with n <= max_new_tokens
    (fewer when `eos_token_id` is produced; it is included)."""
    _check(model, ids.shape[0])
    config, inner = model.config, model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    total = ids.shape[1] + max_new_tokens
    h = inner.embed_tokens(ids)
    caches = [(h.new_zeros(1, kv_heads, total, head_dim), h.new_zeros(1, kv_heads, total, head_dim))
              for _ in inner.layers]
    out, pos = [], 0
    for _ in range(max_new_tokens):
        length = h.shape[1]
        positions = torch.arange(pos, pos + length)[None]
        cos, sin = (t[:, None] for t in inner.rotary_emb(h, positions))
        for layer, (k_cache, v_cache) in zip(inner.layers, caches):
            attn = layer.self_attn
            r = layer.input_layernorm(h)
            q = attn.q_proj(r).view(1, length, heads, head_dim).transpose(1, 2)
            k = attn.k_proj(r).view(1, length, kv_heads, head_dim).transpose(1, 2)
            v = attn.v_proj(r).view(1, length, kv_heads, head_dim).transpose(1, 2)
            q = q * cos + _rotate_half(q) * sin
            k_cache[:, :, pos:pos + length] = k * cos + _rotate_half(k) * sin
            v_cache[:, :, pos:pos + length] = v
            # prefill starts at position 0, so a top-left causal mask is the right one; a single
            # new token attends to everything cached
            o = F.scaled_dot_product_attention(
                q, k_cache[:, :, :pos + length], v_cache[:, :, :pos + length],
                is_causal=length > 1, scale=attn.scaling, enable_gqa=kv_heads != heads)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(1, length, heads * head_dim))
            r = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(r)) * mlp.up_proj(r))
        logits = model.lm_head(inner.norm(h[:, -1:]))
        token = logits[0, -1].argmax()
        out.append(token)
        pos += length
        if eos_token_id is not None and int(token) == eos_token_id:
            break
        h = inner.embed_tokens(token.view(1, 1))
    return torch.stack(out)
