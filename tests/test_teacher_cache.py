"""distill.cache_top_k: the teacher's top-k log-probs over the training blocks, made once; the
coarsened forward KL it feeds is exact KD at k = vocabulary, zero only for the teacher's own
distribution on those tokens, and a run with it never runs the teacher in its steps."""
import copy
import json

import pytest
import torch

from conftest import compose_train
from qat.distill import DistillSpec, Distiller, ForwardKL, freeze
from qat.distill.cache import TeacherCache, build_cache, topk_logprobs
from qat.distill.losses import topk_kl
from qat.lightning.data import GlobalBatchSampler
from qat.train import ConfigError, train


def _logits(n=6, v=50, seed=0):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_at_k_equal_to_the_vocabulary_it_is_the_forward_kl(temperature):
    student, teacher = _logits(seed=0).requires_grad_(), _logits(seed=1)
    logp = torch.log_softmax(teacher / temperature, -1)
    values, ids = logp.topk(teacher.shape[1], -1)
    got = topk_kl(student, values, ids, temperature)
    want = ForwardKL(temperature).per_token(student, teacher)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got, = torch.autograd.grad(got.sum(), student)
    g_want, = torch.autograd.grad(want.sum(), student)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_it_is_zero_for_the_teacher_and_positive_for_another(k):
    teacher = _logits(seed=2)
    values, ids = torch.log_softmax(teacher, -1).topk(k, -1)
    assert topk_kl(teacher, values, ids).abs().max() < 1e-5
    # a student that moves mass between the k tokens and the rest, or among the k, pays for it
    assert (topk_kl(_logits(seed=3), values, ids) > 1e-3).all()
    # it never exceeds the full KL (a coarsening of both distributions: data processing)
    other = _logits(seed=4)
    assert (topk_kl(other, values, ids) <= ForwardKL().per_token(other, teacher) + 1e-5).all()


def test_the_cached_distiller_gives_the_live_teachers_loss_and_gradients(tiny_llama, tmp_path):
    blocks = torch.randint(0, 300, (5, 16), generator=torch.Generator().manual_seed(0))
    teacher = freeze(copy.deepcopy(tiny_llama))
    with torch.no_grad():  # a student that differs from its teacher
        for p in tiny_llama.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    spec = DistillSpec(enabled=True, ce_weight=0.3, chunk_size=7, temperature=1.5,
                       cache_top_k=300)
    cache = build_cache(teacher, blocks, 300, 1.5, tmp_path / "cache", teacher_id="t",
                        batch_size=2)
    rows = torch.tensor([3, 0, 4])  # a batch's rows, out of order
    live = Distiller(spec, teacher)(tiny_llama, blocks[rows])
    g_live = torch.autograd.grad(live["loss"], list(tiny_llama.parameters()))
    cached = Distiller(spec, None, cache)(tiny_llama, blocks[rows], rows=rows)
    g_cached = torch.autograd.grad(cached["loss"], list(tiny_llama.parameters()))
    for key in ("kd_loss", "ce_loss", "loss"):
        torch.testing.assert_close(cached[key], live[key], rtol=1e-5, atol=1e-6)
    for a, b in zip(g_cached, g_live):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="needs its rows"):
        Distiller(spec, None, cache)(tiny_llama, blocks[rows])


def test_the_cache_is_made_once_and_holds_the_teachers_top_k(tiny_llama, tmp_path):
    blocks = torch.randint(0, 300, (3, 8), generator=torch.Generator().manual_seed(1))
    cache = build_cache(tiny_llama, blocks, 4, 1.0, tmp_path / "c", teacher_id="a")
    values, ids = topk_logprobs(tiny_llama, blocks, 4, 1.0)
    got_values, got_ids = cache.rows(torch.tensor([2, 0]))
    assert torch.equal(got_ids, ids[[2, 0]]) and torch.equal(got_values, values[[2, 0]])
    assert cache.bytes == 3 * 8 * 4 * (4 + 4)
    stamp = (tmp_path / "c" / "logp.npy").stat().st_mtime_ns
    build_cache(tiny_llama, blocks, 4, 1.0, tmp_path / "c", teacher_id="a")  # the same key
    assert (tmp_path / "c" / "logp.npy").stat().st_mtime_ns == stamp
    again = build_cache(tiny_llama, blocks, 2, 1.0, tmp_path / "c", teacher_id="a")  # another k
    assert again.values.shape == (3, 8, 2) and json.loads((tmp_path / "c" / "meta.json")
                                                          .read_text())["k"] == 2
    assert not (tmp_path / "c.tmp").exists()
    assert TeacherCache(tmp_path / "c").values.shape == (3, 8, 2)


def test_only_the_rows_the_run_reads_are_cached(tiny_llama, tmp_path):
    sampler = GlobalBatchSampler(10, 3, seed=5)
    first_epoch = [b for b in sampler]
    sampler.set_epoch(1)
    second_epoch = [b for b in sampler]
    want = sorted({r for b in first_epoch + second_epoch[:1] for r in b})
    assert sampler.visited(len(first_epoch) + 1) == want and sampler.epoch == 1
    assert sampler.visited(100) == list(range(10))
    blocks = torch.randint(0, 300, (10, 8), generator=torch.Generator().manual_seed(2))
    rows = sampler.visited(2)
    cache = build_cache(tiny_llama, blocks, 3, 1.0, tmp_path / "c", teacher_id="a", rows=rows)
    assert cache.values.shape == (len(rows), 8, 3) and cache.kept.tolist() == rows
    values, _ = topk_logprobs(tiny_llama, blocks[rows[::-1]], 3, 1.0)
    torch.testing.assert_close(cache.rows(torch.tensor(rows[::-1]))[0], values)
    missing = sorted(set(range(10)) - set(rows))[0]
    with pytest.raises(ValueError, match=rf"training block\(s\) \[{missing}\] are not in"):
        cache.rows(torch.tensor([rows[0], missing]))


@pytest.mark.parametrize("bad, match", [
    ({"cache_top_k": -1}, r"distill\.cache_top_k=-1 must be an integer >= 0"),
    ({"cache_top_k": 8, "loss": "reverse_kl"}, r"distill\.cache_top_k=8 needs distill\.loss="),
    ({"cache_top_k": 8, "hidden_weight": 1.0}, r"distill\.hidden_weight=0"),
])
def test_bad_cache_settings_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        DistillSpec(**bad)


TINY_KD = ["recipe=w4g64_kd", "model=tiny", "data=tiny", "logger=none", "trainer.max_steps=3",
           "trainer.enable_progress_bar=false", "blockwise.samples=4", "blockwise.seq_len=32",
           "blockwise.epochs=1", "blockwise.progress=false", "export.enabled=false",
           "eval.stage_ppl=false"]


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_a_run_with_the_full_cache_trains_as_with_the_teacher(precision, tmp_path, monkeypatch):
    """Under bf16 autocast too: the cache is computed as the live teacher would be in the steps."""
    args = [*TINY_KD, f"trainer.precision={precision}"]
    live = train(compose_train(args), run_dir=tmp_path / "live")
    import qat.distill.teacher as teacher_module

    calls = []
    real = teacher_module.Distiller.__call__

    def spy(self, student, input_ids, labels=None, rows=None):
        calls.append(self.teacher)
        return real(self, student, input_ids, labels, rows)

    monkeypatch.setattr(teacher_module.Distiller, "__call__", spy)
    cached = train(compose_train(args + ["distill.cache_top_k=512"]),
                   run_dir=tmp_path / "cached")
    assert calls and all(t is None for t in calls)  # no step had a teacher to run
    assert cached["ppl"] == pytest.approx(live["ppl"], rel=1e-4)
    assert cached["first_loss"] == pytest.approx(live["first_loss"], rel=1e-3)
    assert (tmp_path / "cached" / "teacher_cache" / "meta.json").is_file()


def test_a_cache_under_several_processes_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(ConfigError, match=r"distill\.cache_top_k=8 works in one process"):
        train(compose_train(TINY_KD + ["distill.cache_top_k=8", "trainer=ddp",
                                       "trainer.accelerator=cpu", "trainer.devices=2"]),
              run_dir=run_dir)
    assert not run_dir.exists()
