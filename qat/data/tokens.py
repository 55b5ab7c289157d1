"""A run's tokens as plain tensors: training blocks, the protocol's eval windows, and the first
sequences of the training split that calibration and the block stage read.

Every stage takes these tensors; only the end-to-end stage wraps them in a Lightning DataModule.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from qat.data.protocol import eval_windows, split_entries
from qat.data.text import DataSpec, load_texts, tokenize

log = logging.getLogger(__name__)


@dataclass
class Tokens:
    """train_blocks (N, block_size); eval_ids (M,) and eval_blocks (eval_windows, eval_window);
    ood_ids / ood_blocks / ood_texts when data.ood is set (else None); val_blocks (val_windows,
    eval_window) from the end of the training split when data.val_windows > 0 (else None);
    eval_texts: the held-out entries."""

    train_blocks: torch.Tensor
    eval_ids: torch.Tensor
    eval_blocks: torch.Tensor
    ood_ids: torch.Tensor | None = None
    ood_blocks: torch.Tensor | None = None
    n_train_entries: int = 0
    n_eval_entries: int = 0
    eval_texts: list[str] | None = None  # the held-out entries (the cloze task's source)
    ood_texts: list[str] | None = None
    val_blocks: torch.Tensor | None = None  # never in train_blocks


def check_positions(spec: DataSpec, max_positions: int | None) -> None:
    """Blocks or windows longer than the model's context are refused up front."""
    for field in ("block_size", "eval_window"):
        size = getattr(spec, field)
        if max_positions is not None and size > max_positions:
            raise ValueError(f"data.{field}={size} exceeds the model's "
                             f"max_position_embeddings={max_positions}")


def load_tokens(spec: DataSpec, tokenizer) -> Tokens:
    """Read, split (the eval protocol's split) and tokenize the corpus `spec` names."""
    s = spec
    where = "data.path" if s.path is not None else "data.name"
    source = s.path if s.path is not None else s.name
    texts = load_texts(source, s.text_field, where, hub=s.path is None)
    train, held_out = split_entries(texts, s.eval_fraction)
    if not train or not held_out:
        raise ValueError(f"{where}: {len(texts)} entries cannot be split by "
                         f"data.eval_fraction={s.eval_fraction} into non-empty train and eval")
    train_ids = tokenize(tokenizer, train)
    train_ids, val_blocks = _cut_validation(train_ids, s, where)
    n_blocks = train_ids.numel() // s.block_size
    if n_blocks == 0:
        raise ValueError(f"{where}: the train split has {train_ids.numel()} tokens, fewer than "
                         f"one block of data.block_size={s.block_size}")
    eval_ids = tokenize(tokenizer, held_out)
    out = Tokens(train_ids[: n_blocks * s.block_size].view(n_blocks, s.block_size), eval_ids,
                 _windows(eval_ids, s, s.eval_windows, where),
                 n_train_entries=len(train), n_eval_entries=len(held_out), eval_texts=held_out,
                 val_blocks=val_blocks)
    if s.ood is not None:
        _, ood_texts = split_entries(load_texts(s.ood, s.text_field, "data.ood"), s.ood_fraction)
        out.ood_ids, out.ood_texts = tokenize(tokenizer, ood_texts), ood_texts
        out.ood_blocks = _windows(out.ood_ids, s, s.ood_windows, "data.ood")
    log.info("data: %d train blocks of %d; eval %d tokens -> %d windows of %d",
             n_blocks, s.block_size, eval_ids.numel(), out.eval_blocks.shape[0], s.eval_window)
    return out


def _cut_validation(train_ids: torch.Tensor, spec: DataSpec, where: str
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training tokens less their last data.val_windows windows, and those windows."""
    n = spec.val_windows * spec.eval_window
    if n == 0:
        return train_ids, None
    if train_ids.numel() < n + spec.block_size:
        raise ValueError(f"data.val_windows={spec.val_windows}: {where}'s train split has "
                         f"{train_ids.numel()} tokens, fewer than {n} for the validation windows "
                         f"and one block of data.block_size={spec.block_size} to train on")
    return train_ids[:-n], train_ids[-n:].reshape(spec.val_windows, spec.eval_window)


def _windows(ids: torch.Tensor, spec: DataSpec, max_windows: int, where: str) -> torch.Tensor:
    if ids.numel() < spec.eval_window:
        raise ValueError(f"{where}: the eval split has {ids.numel()} tokens, fewer than one "
                         f"window of data.eval_window={spec.eval_window}")
    return eval_windows(ids, spec.eval_window, max_windows)


def mix_blocks(real: torch.Tensor, generated: torch.Tensor, share: float) -> torch.Tensor:
    """Training blocks of which `share` are the `generated` ones, spread evenly among the first
    blocks of `real` in order (share 1: `generated` alone). Why the split is cut there rather than
    kept whole: every stage reads the first blocks (calibration, the block stage) or a shuffle of
    all (end to end), and each must see the same mix."""
    n = generated.shape[0]
    if share >= 1:
        return generated
    total = round(n / share)
    if total - n > real.shape[0]:
        raise ValueError(f"data.generated_share={share}: {n} generated blocks need {total - n} "
                         f"blocks of the training split beside them, it has {real.shape[0]}")
    is_generated = torch.tensor([(i + 1) * n // total > i * n // total for i in range(total)])
    mixed = torch.empty(total, *real.shape[1:], dtype=real.dtype)
    mixed[is_generated] = generated.to(real.dtype)
    mixed[~is_generated] = real[: total - n]
    return mixed


def calibration_ids(train_blocks: torch.Tensor, samples: int, seq_len: int, owner: str = "ptq"
                    ) -> torch.Tensor:
    """(samples, seq_len) consecutive training tokens: the first `samples` windows of the split."""
    flat = train_blocks.reshape(-1)
    samples = min(samples, flat.numel() // seq_len)
    if samples == 0:
        raise ValueError(f"{owner}.seq_len={seq_len} is longer than the whole training split "
                         f"({flat.numel()} tokens)")
    return flat[: samples * seq_len].view(samples, seq_len)
