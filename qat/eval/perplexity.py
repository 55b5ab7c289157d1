"""Perplexity over non-overlapping windows: the protocol of eval-protocol.md.

Each window of `window` tokens is an independent forward pass (no BOS, no cache); positions
1..window-1 are predicted from their prefix; PPL = exp(summed NLL / predicted tokens), never a mean
of per-window perplexities. Log-softmax runs in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from qat.data.protocol import eval_windows
from qat.models.blocks import forward_block_by_block
from qat.models.onload import reads_blocks

# rows of logits turned into losses at once: (CHUNK, V) float32 at V=49152 is 48 MiB, so the
# log-softmax of a window never materialises a second (B, T, V) float32 copy of the logits
CE_CHUNK_ROWS = 256


@dataclass(frozen=True)
class PerplexityResult:
    """Perplexity with its parts, so results over several sets can be pooled exactly."""

    ppl: float  # exp(nll_sum / n_tokens)
    nll_sum: float  # summed negative log-likelihood, nats
    n_tokens: int  # predicted tokens: n_windows * (window - 1)
    n_windows: int
    seconds: float = 0.0  # wall time of the forward passes


def window_nll(model: torch.nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed float32 NLL of positions 1..T-1 of every row, one forward pass, no grad bookkeeping.

    The building block of `perplexity`; a LightningModule's validation_step can sum these to get the
    same numbers.

    Args:
        model: a causal LM returning `.logits` (B, T, V).
        input_ids: (B, T) windows; each row is scored independently.

    Returns:
        (nll_sum, n_predicted): a float32 scalar tensor and B * (T - 1).
    """
    return logits_nll(model(input_ids=input_ids, use_cache=False).logits, input_ids)


def logits_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`window_nll` of the model's (B, T, V) logits for `input_ids`."""
    logits = logits[:, :-1].reshape(-1, logits.shape[-1])  # (B*(T-1), V), a view
    targets = input_ids[:, 1:].reshape(-1).to(logits.device)  # (B*(T-1),)
    total = torch.zeros((), dtype=torch.float32, device=logits.device)
    for start in range(0, targets.numel(), CE_CHUNK_ROWS):
        rows = logits[start : start + CE_CHUNK_ROWS].float()
        total += F.cross_entropy(rows, targets[start : start + CE_CHUNK_ROWS], reduction="sum")
    return total, targets.numel()


def _bar(total: int, progress: bool | str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=progress if isinstance(progress, str) else "ppl",
                unit="window", mininterval=2.0)


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, window: int = 512,
               max_windows: int | None = 64, batch_size: int = 4,
               progress: bool | str = False,
               on_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None
               ) -> PerplexityResult:
    """Perplexity of `model` on the first `max_windows` non-overlapping windows of `ids`.

    Runs in eval mode and restores the model's training mode afterwards. `batch_size` windows share a
    forward pass (faster GEMMs); it does not change which tokens are scored.

    Args:
        model: a causal LM (Hugging Face style: `model(input_ids=...).logits`).
        ids: (N,) token ids of the eval text, tokenized without special tokens.
        window: tokens per window (the protocol uses 512).
        max_windows: score at most this many windows (protocol: 64 wiki, 32 Shakespeare).
        batch_size: windows per forward pass.
        progress: a bar over windows with the running perplexity (a string labels it).
        on_logits: also called with each (B, T) batch and its (B, T, V) logits, so a measure of
            the same positions (qat.eval.divergence) shares this forward pass.

    Returns:
        A `PerplexityResult`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = eval_windows(ids, window, max_windows)  # (W, window)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, count, start = 0.0, 0, time.perf_counter()
    bar = _bar(windows.shape[0], progress)

    def each(batch: torch.Tensor, logits: torch.Tensor) -> None:
        if on_logits is not None:
            on_logits(batch, logits)
        add(*logits_nll(logits, batch), batch.shape[0])

    def add(batch_nll: torch.Tensor, n: int, rows: int) -> None:
        nonlocal nll, count
        nll += float(batch_nll)  # accumulate across batches in float64
        count += n
        if bar is not None:
            bar.update(rows)
            bar.set_postfix_str(f"ppl {math.exp(nll / count):.4f}", refresh=False)

    try:
        if reads_blocks(model):  # each block read from the files once, not once per batch
            forward_block_by_block(model, windows.to(device), batch_size, each)
        else:
            for b in range(0, windows.shape[0], batch_size):
                batch = windows[b : b + batch_size].to(device)
                each(batch, model(input_ids=batch, use_cache=False).logits)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return PerplexityResult(ppl=math.exp(nll / count), nll_sum=nll, n_tokens=count,
                            n_windows=windows.shape[0], seconds=time.perf_counter() - start)
