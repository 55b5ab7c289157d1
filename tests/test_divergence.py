"""KL(P_float || P_quantized) from the float model's top-k, and top-1 agreement (issue 33)."""
import copy

import pytest
import torch

from qat.eval.divergence import kl_per_token, summarize, top1_agreement, top_k

V = 512  # the tiny model's vocabulary


def full_kl(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    p, q = (torch.log_softmax(t.double(), -1) for t in (p_logits, q_logits))
    return (p.exp() * (p - q)).sum(-1)


def rest_gap(p_logits: torch.Tensor, q_logits: torch.Tensor, k: int) -> torch.Tensor:
    """KL_full - KL_topk per position (N,), exactly: p_rest * KL(P_rest || Q_rest), the
    divergence inside the bucket that top-k merges (>= 0)."""
    p = torch.log_softmax(p_logits.float(), dim=-1)
    q = torch.log_softmax(q_logits.float(), dim=-1)
    ids = p.topk(min(k, p.shape[-1]), dim=-1).indices
    outside = torch.ones_like(p, dtype=torch.bool).scatter_(-1, ids, False)
    p_rest = torch.where(outside, p, torch.full_like(p, -torch.inf))
    q_rest = torch.where(outside, q, torch.full_like(q, -torch.inf))
    p_mass, q_mass = torch.logsumexp(p_rest, -1, keepdim=True), torch.logsumexp(q_rest, -1,
                                                                                  keepdim=True)
    inside = torch.where(outside, p_rest.exp() * ((p_rest - p_mass) - (q_rest - q_mass)),
                         torch.zeros_like(p))
    return inside.sum(-1).clamp(min=0.0)


def logit_pair(n: int = 64, scale: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, V, generator=g) * 3
    return p, p + scale * torch.randn(n, V, generator=g)


def test_top_k_at_the_whole_vocabulary_is_the_full_kl():
    p, q = logit_pair()
    ref = top_k(p, V)
    assert torch.isneginf(ref.rest).all()  # nothing outside the top k
    torch.testing.assert_close(kl_per_token(ref, q).double(), full_kl(p, q), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("k", [1, 8, 64, 256])
def test_top_k_is_the_full_kl_less_the_divergence_inside_its_rest_bucket(k):
    """KL_full = KL_topk + p_rest * KL(P_rest || Q_rest): the top-k value is a lower bound, and
    its gap is exactly the divergence the bucket merges."""
    p, q = logit_pair(seed=k)
    topk, full, gap = kl_per_token(top_k(p, k), q).double(), full_kl(p, q), rest_gap(p, q, k)
    assert (topk <= full + 1e-5).all() and (gap >= 0).all()
    torch.testing.assert_close(topk + gap.double(), full, rtol=1e-4, atol=1e-5)


def test_a_model_sure_of_a_top_k_token_is_at_a_finite_distance():
    """Q puts all but ~1e-30 of its mass on one of P's top k: 1 - (Q's top-k mass) is 0 in
    float32, yet Q's rest is not, and the bucketed KL is the float64 one on the same buckets."""
    p, _ = logit_pair(n=8)
    ref = top_k(p, 4)
    q = torch.zeros(8, V).scatter(-1, ref.ids[:, :1], 80.0)  # P's top token: all but ~e^-74
    kl = kl_per_token(ref, q)
    assert torch.isfinite(kl).all()
    # the same buckets in float64: P's top 4 and rest, Q's mass on those 4 ids and the rest
    lq = torch.log_softmax(q.double(), -1)
    lq_top = lq.gather(-1, ref.ids)
    lq_rest = torch.logsumexp(lq.scatter(-1, ref.ids, -torch.inf), -1)
    lp_top, lp_rest = ref.logprobs.double(), ref.rest.double()
    want = (lp_top.exp() * (lp_top - lq_top)).sum(-1) + lp_rest.exp() * (lp_rest - lq_rest)
    torch.testing.assert_close(kl.double(), want, rtol=1e-5, atol=1e-4)


def test_a_distribution_against_itself_is_at_distance_0_and_agrees_everywhere():
    p, _ = logit_pair()
    for k in (1, 16, V):
        ref = top_k(p, k)
        assert kl_per_token(ref, p).abs().max() < 1e-5
        assert top1_agreement(ref, p).all()


def test_the_distance_grows_with_the_perturbation_of_a_model():
    """The tiny model against copies whose weights are perturbed more and more: KL grows, top-1
    agreement does not."""
    from qat.models import ModelSpec, load_model

    model, _ = load_model(ModelSpec(name="tiny"))
    ids = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = top_k(model(ids).logits[:, :-1].reshape(-1, V), 64)
        stats = []
        for noise in (0.0, 0.01, 0.05, 0.2):
            other = copy.deepcopy(model)
            g = torch.Generator().manual_seed(2)
            for param in other.parameters():
                param.add_(noise * param.std() * torch.randn(param.shape, generator=g))
            logits = other(ids).logits[:, :-1].reshape(-1, V)
            stats.append(summarize(kl_per_token(reference, logits),
                                   top1_agreement(reference, logits), 64))
    assert stats[0].kl_max < 1e-5 and stats[0].top1 == 1.0
    assert all(a.kl_mean < b.kl_mean for a, b in zip(stats, stats[1:]))
    assert stats[-1].top1 < 1.0 and all(s.kl_mean <= s.kl_p99 <= s.kl_max for s in stats)
    assert stats[-1].n_tokens == 4 * 31


def test_no_positions_is_an_error():
    with pytest.raises(ValueError, match="no predicted positions"):
        summarize(torch.empty(0), torch.empty(0, dtype=torch.bool), 8)


def test_the_float_reference_is_computed_once_and_never_served_stale(tmp_path, monkeypatch):
    """Cached under the float model, the protocol's windows and k: the same three read the cache
    (shown by tampering with it), another protocol, model or k compute afresh."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from qat.data.protocol import eval_windows
    from qat.eval.divergence import divergence
    from qat.eval.perplexity import perplexity
    from qat.eval.stage import float_reference
    from qat.models import ModelSpec, load_model

    monkeypatch.setenv("QAT_CACHE", str(tmp_path))
    model, _ = load_model(ModelSpec(name="tiny"))
    ids = torch.randint(0, V, (600,), generator=torch.Generator().manual_seed(3))
    windows = eval_windows(ids, 32, 4)
    first = float_reference(model, windows, 16, batch_size=2)
    reference = first.top
    assert reference.ids.shape == (4 * 31, 16)
    # the same forward pass gave the float perplexity
    assert first.ppl.ppl == pytest.approx(perplexity(model, ids, 32, 4).ppl, rel=1e-6)
    same = divergence(model, reference, windows, 16)
    assert same.kl_max < 1e-5 and same.top1 == 1.0 and same.n_tokens == 4 * 31
    [path] = (tmp_path / "kl_reference").glob("*.safetensors")
    with safe_open(str(path), "pt") as f:
        stored, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    save_file({**stored, "logprobs": stored["logprobs"] - 1.0}, str(path), metadata)  # tampered
    again = float_reference(model, windows, 16)
    assert torch.equal(again.top.logprobs, reference.logprobs - 1.0)  # the cache is what was read
    assert again.ppl == first.ppl
    fresh = [float_reference(model, eval_windows(ids, 32, 3), 16).top,
             float_reference(model, windows, 8).top]
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.1)
    fresh.append(float_reference(other, windows, 16).top)
    assert torch.equal(fresh[0].logprobs, reference.logprobs[:3 * 31])  # not the tampered one
    assert torch.equal(fresh[1].logprobs, reference.logprobs[:, :8])
    assert not torch.equal(fresh[2].logprobs, reference.logprobs)
    assert len(list((tmp_path / "kl_reference").glob("*.safetensors"))) == 4
    with pytest.raises(ValueError, match="other windows"):
        divergence(model, fresh[0], windows, 16)
