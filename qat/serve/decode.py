"""Lean greedy decoding for Llama-style causal LMs (llama, mistral, qwen2).

Why: at batch 1 on a CPU, Hugging Face `generate` spends ~30 ms per token of SmolLM2-135M outside
the matmuls (measured: the same loop with zero-cost Linears), more than the W4 kernels themselves.
This loop runs the model's own modules (so float, fake-quantized and exported models all work) in
one plain pass per token over the decoder layers, with a preallocated KV cache and no per-step
bookkeeping. Greedy tokens match `generate` (tests/test_decode.py).

An export served by our 4-bit GEMV (float32, every decoder Linear 4-bit) goes further: after the
prompt, each token runs all decoder layers in one native call (qat.native.DecodeStep:
norms, rotary, attention and the Linears in C), leaving only the embedding and the head to torch;
with the int8 head (embedding_bits=8) the head and its argmax run there too. Its logits equal the
torch loop's to float32 rounding (tests/test_decode.py); the call runs on csrc/team.c's team.
"""
from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

SUPPORTED = ("llama", "mistral", "qwen2")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check(model, batch: int) -> None:
    kind = getattr(model.config, "model_type", None)
    if kind not in SUPPORTED:
        raise ValueError(f"qat.serve.decode supports model_type in {list(SUPPORTED)}, got {kind!r}; "
                         "use model.generate")
    if batch != 1:
        raise ValueError(f"qat.serve.decode decodes one sequence (batch 1), got batch {batch}")


_LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
            "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
            "down": "mlp.down_proj"}


def new_caches(model, total: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Zeroed (k, v) caches, (1, kv_heads, total, head_dim) each, one pair per decoder layer."""
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    shape = (1, config.num_key_value_heads, total, head_dim)
    return [(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
            for _ in model.model.layers]


def native_step(model, caches: list[tuple[torch.Tensor, torch.Tensor]]):
    """A native.DecodeStep over `caches` (from new_caches) when every decoder Linear is served by
    our 4-bit GEMV and the glue is what csrc/decode_step.c computes (RMSNorm, SiLU MLP, float32
    embeddings and caches); else None."""
    from qat import native
    from qat.kernels.linear import CPU_NATIVE, QuantizedLinear

    config, inner = model.config, model.model
    total = caches[0][0].shape[2]
    if not native.available() or getattr(config, "hidden_act", None) != "silu" or \
            (getattr(config, "sliding_window", None) or total) < total or \
            inner.embed_tokens(torch.zeros(1, 1, dtype=torch.long)).dtype != torch.float32:
        return None
    probe = torch.zeros(1, 1, config.hidden_size)
    cos, sin = (t[0] for t in inner.rotary_emb(probe, torch.arange(total)[None]))
    layers, eps = [], set()
    for layer in inner.layers:
        spec = {}
        for name, path in _LINEARS.items():
            m = layer.get_submodule(path)
            if not isinstance(m, QuantizedLinear):
                return None
            m.prepare()
            if m.layout != CPU_NATIVE:
                return None
            bias = None if m.bias is None else m.bias.float().contiguous()
            spec[name] = (m.weight_packed, m.weight_scale, m.weight_zero_point, bias,
                          m.in_features, m.group_size)
        for name, norm in (("input_norm", layer.input_layernorm),
                           ("post_norm", layer.post_attention_layernorm)):
            weight = getattr(norm, "weight", None)
            if weight is None or weight.dtype != torch.float32 or \
                    not hasattr(norm, "variance_epsilon"):
                return None
            spec[name] = weight.detach().contiguous()
            eps.add(float(norm.variance_epsilon))
        spec["k_cache"], spec["v_cache"] = caches[len(layers)]
        if spec["k_cache"].dtype != torch.float32:
            return None
        layers.append(spec)
    if len(eps) != 1:
        return None
    attn = inner.layers[0].self_attn
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    values = {"hidden": config.hidden_size, "heads": heads, "kv_heads": kv_heads,
              "head_dim": cos.shape[1], "intermediate": config.intermediate_size,
              "max_len": cos.shape[0], "eps": eps.pop(), "attn_scale": float(attn.scaling)}
    return native.DecodeStep(layers, values, cos.float().contiguous(), sin.float().contiguous(),
                             _int8_head(model))


def _int8_head(model):
    """(codes, scale, final-norm weight, eps) when the head is our int8 one after a float32
    RMSNorm, which the native step then computes too; else None (the head stays in torch)."""
    from qat.kernels.embedding import Int8Head

    head, norm = model.get_output_embeddings(), model.model.norm
    weight = getattr(norm, "weight", None)
    if not isinstance(head, Int8Head) or head is not getattr(model, "lm_head", None) or \
            weight is None or weight.dtype != torch.float32 or not hasattr(norm, "variance_epsilon"):
        return None
    return head.table.codes, head.table.scale, weight.detach().contiguous(), \
        float(norm.variance_epsilon)


def _layers(model, h: torch.Tensor, caches: list[tuple[torch.Tensor, torch.Tensor]],
            pos: int) -> torch.Tensor:
    """The decoder layers in torch ops for h (1, length, hidden) at positions pos.., writing k and v
    into the caches."""
    config, inner = model.config, model.model
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = caches[0][0].shape[-1]
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
    return h


@torch.no_grad()
def greedy(model, ids: torch.Tensor, max_new_tokens: int,
           eos_token_id: int | None = None, native: bool = True,
           threads: int | None = None,
           stop: Callable[[list[int]], bool] | None = None) -> torch.Tensor:
    """Greedy continuation of `ids` (1, T): returns the new token ids, (n,) with n <= max_new_tokens
    (fewer when `eos_token_id` is produced; it is included). `native=False` keeps every step in
    torch even where the one-call native step applies. `threads`: our kernels' team size per step
    (None: all cores where a token is one native call, else chosen from the measured step
    times, see qat.kernels.threads). `stop(new ids so far)`: True ends the decoding there
    (a task's stop strings)."""
    _check(model, ids.shape[0])
    inner = model.model
    h = inner.embed_tokens(ids)
    caches = new_caches(model, ids.shape[1] + max_new_tokens, h.dtype)
    step = native_step(model, caches) if native else None
    whole = step is not None and step.head is not None  # a token is one native call
    governor = None if whole else _governor(threads)
    team = threads or _native_threads()
    if governor is not None:
        governor.begin()
    out, pos = [], 0
    try:
        for _ in range(max_new_tokens):
            length = h.shape[1]
            with governor.step() if governor is not None and length == 1 else nullcontext() as s:
                if step is not None and length == 1:  # all layers in one native call, in place
                    h = h.contiguous()
                    token = step(h.view(-1), pos, threads=s.threads if s else team)
                    token = None if token is None else torch.tensor(token)
                else:
                    h, token = _layers(model, h, caches, pos), None
                if token is None:
                    token = model.lm_head(inner.norm(h[:, -1:]))[0, -1].argmax()
            pos += length
            out.append(token)
            if eos_token_id is not None and int(token) == eos_token_id or \
                    stop is not None and stop([int(t) for t in out]):
                break
            h = inner.embed_tokens(token.view(1, 1))
    finally:
        if governor is not None:
            governor.close()
        if step is not None:
            step.close()
    return torch.stack(out)


def _native_threads() -> int:
    from qat import native

    return native.max_threads()


def _governor(threads: int | None):
    """threads=None: our kernels' team size follows the measured step times (one thread when
    other processes hold the cores); an int fixes it for this call."""
    from qat import native
    from qat.kernels.threads import ThreadGovernor

    if not native.available():
        return None
    global _GOVERNOR
    most = native.max_threads()
    if threads is not None:
        return ThreadGovernor(_set_threads, most, start=threads, adapt=False)
    if _GOVERNOR is None or _GOVERNOR.most != most:  # what it learnt carries over between calls
        _GOVERNOR = ThreadGovernor(_set_threads, most)
    return _GOVERNOR


def _set_threads(n: int) -> None:
    """Our kernels' team and torch's (the head's argmax over the vocabulary is a parallel loop
    too): every barrier in a step waits for the slowest thread."""
    from qat import native

    native.set_threads(n)
    if torch.get_num_threads() != min(n, _TORCH_THREADS):
        torch.set_num_threads(min(n, _TORCH_THREADS))


_TORCH_THREADS = torch.get_num_threads()


_GOVERNOR = None

