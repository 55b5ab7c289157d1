"""Distillation losses: small modules, computed in float32, masked with `ignore_index`.

Each vocabulary-sized loss gives a per-token value from (N, V) student and teacher logits; the
sequence is fed to it in chunks (`chunked_token_loss`) so a 150k-token vocabulary never needs a
full (B, T, V) float32 copy at once. Divergences at temperature T are multiplied by T^2 so their
gradient scale does not shrink with T (Hinton et al. 2015).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100


class _Divergence(nn.Module):
    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"distill.temperature={temperature!r} must be > 0")
        self.temperature = temperature

    def log_probs(self, student: torch.Tensor, teacher: torch.Tensor):
        t = self.temperature
        return (F.log_softmax(student.float() / t, dim=-1),
                F.log_softmax(teacher.float() / t, dim=-1))

    def per_token(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """(N, V) logits -> (N,) loss, already multiplied by T^2."""
        raise NotImplementedError

    def forward(self, student: torch.Tensor, teacher: torch.Tensor,
                labels: torch.Tensor | None = None, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
        """Mean over the tokens whose label is not `ignore_index`; logits (..., V), labels (...)."""
        losses = self.per_token(student.reshape(-1, student.shape[-1]),
                                teacher.reshape(-1, teacher.shape[-1]))
        if labels is None:
            return losses.mean()
        keep = (labels.reshape(-1) != ignore_index).float()
        return (losses * keep).sum() / keep.sum().clamp(min=1.0)


class ForwardKL(_Divergence):
    """KL(teacher || student): the student covers every mode of the teacher (standard KD)."""

    def per_token(self, student, teacher):
        log_s, log_t = self.log_probs(student, teacher)
        return (log_t.exp() * (log_t - log_s)).sum(-1) * self.temperature ** 2


class ReverseKL(_Divergence):
    """KL(student || teacher): mode seeking, the student commits to the teacher's main modes."""

    def per_token(self, student, teacher):
        log_s, log_t = self.log_probs(student, teacher)
        return (log_s.exp() * (log_s - log_t)).sum(-1) * self.temperature ** 2


class JSD(_Divergence):
    """Generalised Jensen-Shannon: beta KL(t || m) + (1 - beta) KL(s || m), m = beta t + (1-beta) s.

    Symmetric at beta = 0.5, bounded by log 2 (times T^2): robust when the student starts far off.
    """

    def __init__(self, temperature: float = 1.0, beta: float = 0.5) -> None:
        super().__init__(temperature)
        if not 0.0 < beta < 1.0:
            raise ValueError(f"distill.jsd_beta={beta!r} must be in (0, 1)")
        self.beta = beta

    def per_token(self, student, teacher):
        log_s, log_t = self.log_probs(student, teacher)
        b = self.beta
        log_m = torch.logsumexp(torch.stack([log_t + torch.log(torch.tensor(b)),
                                             log_s + torch.log(torch.tensor(1 - b))]), dim=0)
        kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
        kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
        return (b * kl_t + (1 - b) * kl_s) * self.temperature ** 2


DIVERGENCES = {"forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": JSD}


class HiddenStateLoss(nn.Module):
    """Distance between student and teacher hidden states of mapped layers, masked per token.

    mse: mean squared error per element; cosine: 1 - cosine similarity per token. Averaged over
    the layer pairs.
    """

    def __init__(self, kind: str = "mse") -> None:
        super().__init__()
        if kind not in ("mse", "cosine"):
            raise ValueError(f"distill.hidden_loss={kind!r} is not one of ('mse', 'cosine')")
        self.kind = kind

    def forward(self, student: list[torch.Tensor], teacher: list[torch.Tensor],
                keep: torch.Tensor) -> torch.Tensor:
        """Lists of (B, T, H) states, keep (B, T) bool."""
        keep = keep.float()
        total = 0.0
        for s, t in zip(student, teacher, strict=True):
            s, t = s.float(), t.float()
            if self.kind == "mse":
                per_token = (s - t).pow(2).mean(-1)
            else:
                per_token = 1.0 - F.cosine_similarity(s, t, dim=-1)
            total = total + (per_token * keep).sum() / keep.sum().clamp(min=1.0)
        return total / max(len(student), 1)


def shifted_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Next-token targets: position i predicts labels[i + 1]; the last position has none."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1)


def topk_kl(student: torch.Tensor, teacher_logp: torch.Tensor, teacher_ids: torch.Tensor,
            temperature: float = 1.0) -> torch.Tensor:
    """Forward KL from the teacher's top-k tokens: (N, V) student logits, (N, k) teacher
    log-probabilities (at `temperature`) and token ids -> (N,) loss times T^2.

    Both distributions are coarsened to the k tokens plus one class for the rest of the vocabulary
    (the teacher's rest mass is 1 - sum of its k probabilities): the KL of those is exact KD when k
    is the vocabulary, >= 0, and zero only when the student gives each of the k tokens the
    teacher's probability."""
    t = temperature
    q = F.log_softmax(student.float() / t, dim=-1).gather(-1, teacher_ids)  # (N, k)
    p_log = teacher_logp.float()
    p = p_log.exp()
    kl = (p * (p_log - q)).sum(-1)
    rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    # log of the student's rest mass, 1 - sum exp(q), kept finite when the k tokens take it all
    rest_q = torch.log(-torch.expm1(torch.logsumexp(q, -1).clamp(max=-1e-6)))
    return (kl + torch.xlogy(rest, rest) - rest * rest_q) * (t * t)


def chunked_token_loss(divergence: _Divergence, student_hidden: torch.Tensor,
                       teacher_hidden: torch.Tensor, student_head: Callable[[torch.Tensor], torch.Tensor],
                       teacher_head: Callable[[torch.Tensor], torch.Tensor], targets: torch.Tensor,
                       chunk_size: int | None, ignore_index: int = IGNORE_INDEX,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed divergence and summed CE over the kept tokens, and the kept-token count.

    Hidden states (B, T, H) are flattened and sent through the heads `chunk_size` tokens at a time;
    with more than one chunk each chunk is recomputed in backward (activation checkpointing), so
    only one chunk's (chunk, V) logits exist at any moment. Teacher logits never need a gradient.
    """
    t_flat = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])

    def kd_of(s_logits: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        with torch.no_grad():
            t_logits = teacher_head(t_flat[start:stop]).float()
        return divergence.per_token(s_logits, t_logits)

    return chunked_student_loss(student_hidden, student_head, targets, chunk_size, kd_of,
                                ignore_index)


def chunked_student_loss(student_hidden: torch.Tensor,
                         student_head: Callable[[torch.Tensor], torch.Tensor],
                         targets: torch.Tensor, chunk_size: int | None,
                         kd_of: Callable[[torch.Tensor, int, int], torch.Tensor],
                         ignore_index: int = IGNORE_INDEX,
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`chunked_token_loss` with the teacher's side given as `kd_of(student_logits, start, stop)`:
    the per-token divergence of flattened tokens [start, stop) (a live teacher, or a cache)."""
    s_flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    tgt = targets.reshape(-1)
    n = s_flat.shape[0]
    size = n if not chunk_size else min(chunk_size, n)

    def one_chunk(s_h, y, start):
        s_logits = student_head(s_h).float()
        keep = (y != ignore_index).float()
        kd = (kd_of(s_logits, start, start + s_h.shape[0]) * keep).sum()
        ce = F.cross_entropy(s_logits, y, ignore_index=ignore_index, reduction="sum")
        return kd, ce

    kd_sum = ce_sum = s_flat.new_zeros((), dtype=torch.float32)
    for start in range(0, n, size):
        part = (s_flat[start:start + size], tgt[start:start + size], start)
        if size < n and torch.is_grad_enabled():
            kd, ce = checkpoint(one_chunk, *part, use_reentrant=False)
        else:
            kd, ce = one_chunk(*part)
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    count = (tgt != ignore_index).sum()
    return kd_sum, ce_sum, count
