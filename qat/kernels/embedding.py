"""Int8 token embedding that also serves as the output head: the largest bf16 tensor of a small
model (SmolLM2-135M: 49152 x 576, 57 MB of a 116 MB W4 export) at half the bytes.

A serving-time choice (`load_quantized(..., embedding_bits=8)`), like llama.cpp's Q8 output
tensor: the export keeps the bf16 table that vLLM loads. One float32 scale per token row,
symmetric, round-to-nearest; the head's logits are computed in float32 by the native GEMV (reading
int8) when available, else by dequantizing.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from qat import native


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(V, D) float -> (codes (V, D) int8 in [-127, 127], scale (V,) float32), w ~ codes * scale."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes.contiguous(), scale.contiguous()


class Int8Embedding(nn.Module):
    """nn.Embedding over int8 codes with one scale per row; `dtype` is what lookups return."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype = torch.float32,
                 embed_scale: torch.Tensor | float | None = None):
        super().__init__()
        codes, scale = quantize_rows(weight)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.num_embeddings, self.embedding_dim = codes.shape
        self.dtype = dtype
        # a scaled embedding (Gemma: x sqrt(hidden)) multiplies its lookups, in the table's dtype
        self.embed_scale = None if embed_scale is None else torch.as_tensor(embed_scale).detach()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = (self.codes[ids].float() * self.scale[ids, None]).to(self.dtype)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(device=rows.device, dtype=self.dtype)
        return rows

    def weight_bytes(self) -> int:
        return self.codes.numel() * self.codes.element_size() + self.scale.numel() * 4

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]


class Int8Head(nn.Module):
    """logits = h @ table.T over an `Int8Embedding` (shared with the input for tied models)."""

    def __init__(self, table: Int8Embedding):
        super().__init__()
        self.table = table

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if h.is_cpu and native.available():
            return native.linear_q8(h, self.table.codes, self.table.scale)
        return F.linear(h.float(), self.table.dequantize())


def int8_embeddings(model: nn.Module) -> nn.Module:
    """Replace a causal LM's input embedding and output head by int8 ones, in place.

    Tied models (one table for both) keep one int8 table; untied ones get one each.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    kind = type(model).__name__
    if not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise ValueError(f"embedding_bits=8 needs an nn.Embedding input and an nn.Linear head; "
                         f"{kind} has {type(emb).__name__} and {type(head).__name__}")
    if head.bias is not None:
        raise ValueError(f"embedding_bits=8: the output head of {kind} has a bias, which the int8 "
                         "head does not serve; load it without embedding_bits")
    embed_scale = getattr(emb, "embed_scale", None)
    if type(emb).forward is not nn.Embedding.forward and embed_scale is None:
        raise ValueError(f"embedding_bits=8: {type(emb).__name__} ({kind}) computes "
                         "its lookups its own way; only plain and scaled (embed_scale) embeddings "
                         "are supported")
    tied = head.weight is emb.weight
    table = Int8Embedding(emb.weight, dtype=emb.weight.dtype, embed_scale=embed_scale)
    model.set_input_embeddings(table)
    model.set_output_embeddings(Int8Head(table if tied else Int8Embedding(head.weight)))
    model.config.tie_word_embeddings = False  # nothing left for transformers to re-tie
    return model
