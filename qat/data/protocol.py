"""The evaluation protocol of eval-protocol.md, defined once: the held-out split of a corpus (the
last fraction of ENTRIES, in file order), the join and tokenization, the non-overlapping windows.
The data config, the run, the eval command and the perplexity all use these definitions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qat.data.text import load_texts, tokenize


def split_entries(texts: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval): the eval split is the last n - int(n * (1 - eval_fraction)) entries, in order.

    For the 10,033 wiki summaries at 0.05 that is 502 entries, as the protocol requires.
    """
    n_train = int(len(texts) * (1.0 - eval_fraction))
    return texts[:n_train], texts[n_train:]


def eval_windows(ids: torch.Tensor, window: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a 1-D token tensor into its first non-overlapping windows.

    Args:
        ids: (N,) token ids.
        window: tokens per window.
        max_windows: keep at most this many (None: all complete windows).

    Returns:
        (W, window) int64, W = min(max_windows, N // window); the ragged tail is dropped.

    Raises:
        ValueError: fewer than `window` tokens, or bad `window` / `max_windows`.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D token ids, got shape {tuple(ids.shape)}")
    if window < 2:
        raise ValueError(f"window must be >= 2 (one context + one predicted token), got {window}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"max_windows must be >= 1 or None, got {max_windows}")
    n = ids.numel() // window
    if n == 0:
        raise ValueError(f"{ids.numel()} tokens are fewer than one eval window of {window}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * window].view(n, window).long()


@dataclass(frozen=True)
class EvalSet:
    """One scored text: a corpus, its held-out fraction and how many windows of it count."""

    name: str  # the label in tables and JSON: "eval" (in-domain) or "ood"
    corpus: str  # builtin (wiki | shakespeare | tiny), a local .txt/.json/.jsonl, or a hub id
    fraction: float = 0.05  # the last fraction of entries is held out
    windows: int = 64
    text_field: str = "text"


def protocol_sets(data: str = "wiki", ood: str | None = "shakespeare", windows: int = 64,
                  ood_windows: int = 32, fraction: float = 0.05,
                  ood_fraction: float = 0.05) -> list[EvalSet]:
    """eval-protocol.md's two sets by default: 64 wiki windows and 32 Shakespeare windows."""
    sets = [EvalSet("eval", data, fraction, windows)]
    if ood is not None:
        sets.append(EvalSet("ood", ood, ood_fraction, ood_windows))
    return sets


def held_out_texts(eval_set: EvalSet) -> list[str]:
    """The held-out entries of `eval_set`'s corpus, in order."""
    texts = load_texts(eval_set.corpus, eval_set.text_field, f"{eval_set.name} corpus", hub=True)
    _, held_out = split_entries(texts, eval_set.fraction)
    if not held_out:
        raise ValueError(f"{eval_set.name} corpus {eval_set.corpus!r}: {len(texts)} entries leave "
                         f"nothing to hold out at fraction {eval_set.fraction}")
    return held_out


def held_out_ids(tokenizer, eval_set: EvalSet) -> torch.Tensor:
    """(N,) ids of the held-out entries joined by blank lines, as a run builds them (qat.data.tokens)."""
    return tokenize(tokenizer, held_out_texts(eval_set))
