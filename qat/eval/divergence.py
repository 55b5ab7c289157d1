"""Distance of a quantized model's next-token distributions to the float model's (issue 33): the
KL divergence KL(P_float || P_quantized) in nats per predicted token, and top-1 agreement.

The float model's distribution at each position is kept as its top-k log-probabilities plus the
rest of its mass as one bucket, so the float side is computed once and cached small. Merging the
tokens outside the top k into one bucket can only lower the divergence (the log-sum inequality):

    KL_full = KL_topk + p_rest * KL(P_rest || Q_rest)        (P_rest, Q_rest: renormalised rests)

so the top-k value is a lower bound of the full one, equal to it when k covers the vocabulary
(tests/test_divergence.py checks the identity).
Everything is computed in float32 from log-softmax, positions 1..T-1 of each window (those the
perplexity protocol scores).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TopK:
    """The reference distributions at N positions: top-k log-probs and token ids (N, k), and the
    log of the mass outside them (N,) (-inf when the top k hold all of it)."""

    logprobs: torch.Tensor
    ids: torch.Tensor
    rest: torch.Tensor


def top_k(logits: torch.Tensor, k: int) -> TopK:
    """The (N, V) logits' distributions as TopK (k capped at V)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]), dim=-1)
    rest = values.new_full(values.shape[:-1], -torch.inf) if k >= logprobs.shape[-1] \
        else _log_rest(values)  # the whole vocabulary: no rest, not float32's 1e-7 of one
    return TopK(values, ids, rest)


def _log_rest(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum(exp(logprobs))) per row, computed as log(-expm1(logsumexp)): exact near 0."""
    kept = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    return torch.log(-torch.expm1(kept))


def kl_per_token(reference: TopK, logits: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position (N,), nats: P the reference's top k and rest bucket, Q the (N, V)
    `logits`' distributions bucketed alike."""
    q = torch.log_softmax(logits.float(), dim=-1)
    q_top = q.gather(-1, reference.ids)
    p_top = reference.logprobs
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    # Q's mass outside P's top k, summed where it is (not 1 - the top k's: a model sure of a
    # top-k token leaves a rest below float32's resolution of 1, which would read as 0 and make
    # the divergence infinite)
    p_rest, q_rest = reference.rest, torch.logsumexp(q.scatter(-1, reference.ids, -torch.inf), -1)
    rest = torch.where(torch.isneginf(p_rest), torch.zeros_like(p_rest),
                       p_rest.exp() * (p_rest - q_rest))
    return (kl + rest).clamp(min=0.0)  # rounding can leave -1e-9 where P == Q


def top1_agreement(reference: TopK, logits: torch.Tensor) -> torch.Tensor:
    """Per position (N,): whether `logits` put their highest probability on the reference's."""
    return logits.float().argmax(-1) == reference.ids[:, 0]


@dataclass(frozen=True)
class Divergence:
    """KL(P_float || P_quantized) over the scored positions, and top-1 agreement."""

    kl_mean: float  # nats per predicted token
    kl_p99: float
    kl_max: float
    top1: float  # fraction of positions whose top-1 token is the reference's
    n_tokens: int
    k: int  # the reference's top-k (exact when k >= the vocabulary)

    def to_dict(self) -> dict:
        return {"kl_mean": self.kl_mean, "kl_p99": self.kl_p99, "kl_max": self.kl_max,
                "top1": self.top1, "kl_top_k": self.k}  # n_tokens: the perplexity's


def summarize(kl: torch.Tensor, agree: torch.Tensor, k: int) -> Divergence:
    """Mean, 99th percentile and maximum of per-position KLs, and the agreement fraction."""
    if kl.numel() == 0:
        raise ValueError("divergence: no predicted positions to compare")
    kl = kl.double()
    return Divergence(kl_mean=float(kl.mean()), kl_p99=float(torch.quantile(kl, 0.99)),
                      kl_max=float(kl.max()), top1=float(agree.double().mean()),
                      n_tokens=int(kl.numel()), k=k)


def scored(logits: torch.Tensor) -> torch.Tensor:
    """(B*(T-1), V) rows of (B, T, V) `logits` at the positions the perplexity protocol scores
    (1..T-1 of each window), on the CPU."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]).cpu()


class TopKCollector:
    """The float model's TopK gathered batch by batch: `add` is perplexity()'s `on_logits`, so
    the reference costs no pass of its own."""

    def __init__(self, k: int):
        self.k, self.parts = k, []

    def add(self, batch: torch.Tensor, logits: torch.Tensor) -> None:
        self.parts.append(top_k(scored(logits), self.k))

    def result(self) -> TopK:
        return TopK(torch.cat([p.logprobs for p in self.parts]),
                    torch.cat([p.ids.to(torch.int32) for p in self.parts]),
                    torch.cat([p.rest for p in self.parts]))


class DivergenceMeter:
    """A model's KL to `reference` and top-1 agreement, batch by batch over the windows the
    reference was made on (in the same order): `add` is perplexity()'s `on_logits`."""

    def __init__(self, reference: TopK, k: int, windows: torch.Tensor):
        expected = windows.shape[0] * (windows.shape[1] - 1)
        if reference.ids.shape[0] != expected:
            raise ValueError(f"divergence: the reference holds {reference.ids.shape[0]} "
                             f"positions, the windows score {expected}: made on other windows")
        self.reference, self.k, self.start, self.kls, self.agree = reference, k, 0, [], []

    def add(self, batch: torch.Tensor, logits: torch.Tensor) -> None:
        rows = scored(logits)
        n, ref, at = rows.shape[0], self.reference, self.start
        part = TopK(ref.logprobs[at:at + n], ref.ids[at:at + n].long(), ref.rest[at:at + n])
        self.kls.append(kl_per_token(part, rows))
        self.agree.append(top1_agreement(part, rows))
        self.start += n

    def result(self) -> Divergence:
        return summarize(torch.cat(self.kls), torch.cat(self.agree), self.k)


def _each_batch(model: torch.nn.Module, windows: torch.Tensor, batch_size: int, each) -> None:
    """`each(batch, logits)` over the (W, T) `windows`: perplexity()'s loop (eval mode, block by
    block for an onloaded model), its number unused."""
    from qat.eval.perplexity import perplexity

    perplexity(model, windows.reshape(-1), window=windows.shape[1], max_windows=windows.shape[0],
               batch_size=batch_size, on_logits=each)


@torch.no_grad()
def reference_top_k(model: torch.nn.Module, windows: torch.Tensor, k: int,
                    batch_size: int = 4) -> TopK:
    """The float model's TopK at every scored position of the (W, T) protocol `windows`."""
    collector = TopKCollector(k)
    _each_batch(model, windows, batch_size, collector.add)
    return collector.result()


@torch.no_grad()
def divergence(model: torch.nn.Module, reference: TopK, windows: torch.Tensor, k: int,
               batch_size: int = 4) -> Divergence:
    """`model`'s distance to the reference over the same (W, T) `windows` it was made on."""
    meter = DivergenceMeter(reference, k, windows)
    _each_batch(model, windows, batch_size, meter.add)
    return meter.result()
