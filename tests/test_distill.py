"""Distillation: the losses' values and gradients, chunking, the frozen teacher, data-free text."""
import copy
import csv
import math
from pathlib import Path

import pytest
import torch

from qat.distill import (JSD, DistillSpec, Distiller, ForwardKL, HiddenStateLoss, ReverseKL,
                         chunked_token_loss, freeze)
from qat.data.tokens import mix_blocks
from qat.distill.teacher_text import generated_blocks
from qat.distill.losses import shifted_targets
from qat.train import ConfigError, train
from conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "qat" / "conf"
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "trainer.enable_progress_bar=false"]
LOSSES = {"forward_kl": ForwardKL, "reverse_kl": ReverseKL, "jsd": JSD}


def _logits(seed, shape=(6, 50), scale=3.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _reference(kind, s, t, temperature, beta=0.5):
    """Textbook definitions from probabilities, in float64."""
    p_s = torch.softmax(s.double() / temperature, -1)
    p_t = torch.softmax(t.double() / temperature, -1)

    def kl(p, q):
        return (p * (p.log() - q.log())).sum(-1)

    if kind == "forward_kl":
        per = kl(p_t, p_s)
    elif kind == "reverse_kl":
        per = kl(p_s, p_t)
    else:
        m = beta * p_t + (1 - beta) * p_s
        per = beta * kl(p_t, m) + (1 - beta) * kl(p_s, m)
    return per.mean() * temperature ** 2


@pytest.mark.parametrize("kind", list(LOSSES))
def test_divergence_is_zero_for_equal_and_positive_otherwise(kind):
    s, t = _logits(0), _logits(1)
    loss = LOSSES[kind]()
    assert loss(s, s.clone()).abs().item() < 1e-6
    assert loss(s, t).item() > 1e-2


@pytest.mark.parametrize("kind", list(LOSSES))
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_divergence_values_and_gradients_match_the_definition(kind, temperature):
    s, t = _logits(2), _logits(3)
    ours_s = s.clone().requires_grad_(True)
    value = LOSSES[kind](temperature)(ours_s, t)
    value.backward()
    ref_s = s.double().requires_grad_(True)
    ref = _reference(kind, ref_s, t, temperature)
    ref.backward()
    torch.testing.assert_close(value.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_s.grad.double(), ref_s.grad, rtol=1e-4, atol=1e-7)


def test_forward_kl_gradient_is_t_times_probability_difference():
    """d/ds of T^2 KL(p_t || p_s) is T (p_s - p_t): the T^2 factor keeps gradients O(1) in T."""
    s, t = _logits(4), _logits(5)
    for temperature in (1.0, 3.0):
        x = s.clone().requires_grad_(True)
        ForwardKL(temperature)(x, t).backward()
        expected = temperature * (torch.softmax(s / temperature, -1)
                                  - torch.softmax(t / temperature, -1)) / s.shape[0]
        torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-7)


def test_temperature_scaling_is_t_squared():
    s, t = _logits(6), _logits(7)
    soft = ForwardKL(3.0)(s, t)
    plain_on_scaled = ForwardKL(1.0)(s / 3.0, t / 3.0)
    torch.testing.assert_close(soft, 9.0 * plain_on_scaled)


@pytest.mark.parametrize("kind", list(LOSSES))
def test_masked_positions_contribute_nothing(kind):
    s, t = _logits(8, (2, 5, 40)), _logits(9, (2, 5, 40))
    labels = torch.randint(0, 40, (2, 5))
    labels[0, 3:] = -100
    x = s.clone().requires_grad_(True)
    loss = LOSSES[kind]()(x, t, labels)
    loss.backward()
    assert torch.all(x.grad[0, 3:] == 0)
    changed = s.clone()
    changed[0, 3:] += 100 * torch.randn(2, 40)
    torch.testing.assert_close(LOSSES[kind]()(changed, t, labels), loss.detach())
    keep = labels != -100
    torch.testing.assert_close(loss.detach(), LOSSES[kind]()(s[keep], t[keep]))


def test_chunked_loss_and_gradients_equal_unchunked():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(16, 70, bias=False), torch.nn.Linear(16, 70, bias=False)
    h_s, h_t = torch.randn(3, 11, 16), torch.randn(3, 11, 16)
    targets = shifted_targets(torch.randint(0, 70, (3, 11)))
    results = []
    for chunk in (None, 4, 7):
        head_s.zero_grad()
        x = h_s.clone().requires_grad_(True)
        kd, ce, n = chunked_token_loss(ForwardKL(2.0), x, h_t, head_s, head_t, targets, chunk)
        (kd + ce).backward()
        results.append((kd.detach(), ce.detach(), n, x.grad.clone(), head_s.weight.grad.clone()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert results[0][2] == 3 * 10  # the last position of every row has no target


def test_hidden_state_loss_zero_for_equal_and_masks():
    a, b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    keep = torch.ones(2, 4, dtype=torch.bool)
    for kind in ("mse", "cosine"):
        loss = HiddenStateLoss(kind)
        assert loss([a], [a.clone()], keep).item() < 1e-6
        assert loss([a], [b], keep).item() > 0
    keep[1, 2:] = False
    c = b.clone()
    c[1, 2:] = 0
    torch.testing.assert_close(HiddenStateLoss("mse")([a], [b], keep),
                               HiddenStateLoss("mse")([a], [c], keep))
    with pytest.raises(ValueError, match="distill.hidden_loss"):
        HiddenStateLoss("l1")


def test_distiller_ce_matches_the_model_loss_and_self_kd_is_zero(tiny_llama):
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    teacher = freeze(copy.deepcopy(tiny_llama))
    spec = DistillSpec(enabled=True, ce_weight=0.5, hidden_weight=1.0, chunk_size=10)
    out = Distiller(spec, teacher)(tiny_llama, ids)
    with torch.no_grad():
        reference_ce = tiny_llama(input_ids=ids, labels=ids).loss
    torch.testing.assert_close(out["ce_loss"].detach(), reference_ce, rtol=1e-5, atol=1e-6)
    assert out["kd_loss"].abs().item() < 1e-5 and out["hidden_loss"].abs().item() < 1e-8
    torch.testing.assert_close(out["loss"].detach(), 0.5 * reference_ce, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bad, match", [
    ({"loss": "kl"}, "distill.loss"), ({"temperature": 0}, "distill.temperature"),
    ({"ce_weight": -1}, "distill.ce_weight"), ({"hidden_loss": "l2"}, "distill.hidden_loss"),
    ({"chunk_size": 0}, "distill.chunk_size"), ({"hidden_layers": [[1]]}, "distill.hidden_layers"),
    ({"teacher": {"dtype": "int8"}}, "distill.teacher.dtype"),
    ({"enabled": True, "kd_weight": 0}, "nothing to train on"),
])
def test_bad_distill_values_are_named(bad, match):
    with pytest.raises(ValueError, match=match):
        DistillSpec(**bad)


def test_kd_run_logs_both_losses_and_keeps_the_teacher_out(tmp_path, monkeypatch):
    """The teacher stays bit-identical through training and is absent from the checkpoint."""
    import qat.train.run as run

    seen = {}
    original = run.build_teacher

    def keep(spec, student, tokenizer, student_dir):
        seen["teacher"] = original(spec, student, tokenizer, student_dir)
        seen["before"] = {k: v.clone() for k, v in seen["teacher"].state_dict().items()}
        return seen["teacher"]

    monkeypatch.setattr(run, "build_teacher", keep)  # observe (not replace) the real teacher
    cfg = compose_train(TINY + ["recipe=w2g128_kd", "trainer.max_steps=3", "logger=csv",
                                "distill.ce_weight=0.1"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["steps"] == 3
    for key, value in seen["teacher"].state_dict().items():
        assert torch.equal(value, seen["before"][key]), key
    assert not any(p.requires_grad for p in seen["teacher"].parameters())
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    student_keys = {k for k in ckpt["state_dict"] if k.startswith("model.")}
    assert student_keys == set(ckpt["state_dict"])  # nothing but the student
    state = ckpt["state_dict"]  # scales-only: each quantized weight held as its codes
    n_student = sum(v.numel() for k, v in state.items()
                    if "fake_quant" not in k and ".float_" not in k) \
        + sum(v.numel() * (2 if v.dtype == torch.uint8 else 1)  # 4-bit: two codes per byte
              for k, v in state.items() if k.endswith("weight_fake_quant.codes"))
    assert n_student == sum(p.numel() for p in seen["teacher"].state_dict().values())
    with open(tmp_path / "logs" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    kd = [float(r["train/kd_loss"]) for r in rows if r.get("train/kd_loss")]
    ce = [float(r["train/ce_loss"]) for r in rows if r.get("train/ce_loss")]
    assert len(kd) == 3 and len(ce) == 3 and all(math.isfinite(v) and v >= 0 for v in kd)


def test_teacher_with_another_vocabulary_fails_before_training(tmp_path):
    from qat.models import ModelSpec, load_model

    other, tokenizer = load_model(ModelSpec(name="tiny", vocab_size=400))
    other.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose_train(TINY + ["recipe=w4g128_kd", "trainer.max_steps=2",
                                f"distill.teacher.path={tmp_path / 'teacher'}"])
    with pytest.raises(ConfigError, match="vocabulary"):
        train(cfg, run_dir=run_dir)
    assert not run_dir.exists()


def test_missing_teacher_path_is_named(tmp_path):
    cfg = compose_train(TINY + ["recipe=w4g128_kd", f"distill.teacher.path={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="distill.teacher.path"):
        train(cfg, run_dir=tmp_path / "run")


def test_teacher_generated_text_is_sampled_once_and_cached(tiny_llama, tmp_path):
    teacher = freeze(tiny_llama)
    first = generated_blocks(teacher, None, 5, 12, tmp_path, seed=1)
    assert first.shape == (5, 12) and first.min() >= 0 and first.max() < 300
    cached = list((tmp_path / "generated").glob("*.safetensors"))
    assert len(cached) == 1
    again = generated_blocks(teacher, None, 5, 12, tmp_path, seed=1)
    assert torch.equal(first, again)
    other = generated_blocks(teacher, None, 5, 12, tmp_path, seed=2)
    assert not torch.equal(first, other)


def test_teacher_text_mixes_evenly_into_the_first_blocks():
    real = torch.arange(40).view(10, 4)
    generated = -torch.arange(1, 13).view(3, 4)
    mixed = mix_blocks(real, generated, 0.25)  # 3 generated among 9 of the split's blocks
    assert mixed.shape == (12, 4)
    is_generated = mixed[:, 0] < 0
    assert is_generated.tolist() == [False, False, False, True] * 3  # evenly spaced
    assert torch.equal(mixed[is_generated], generated)  # each once, in order
    assert torch.equal(mixed[~is_generated], real[:9])  # the split's first blocks, in order
    assert torch.equal(mix_blocks(real, generated, 1.0), generated)
    with pytest.raises(ValueError, match="data.generated_share"):
        mix_blocks(real, generated, 0.2)  # 12 of the split's blocks needed, 10 there


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_data_free_run_trains_on_teacher_text(tmp_path, share):
    cfg = compose_train(TINY + ["recipe=w4g128_kd", "trainer.max_steps=2", "logger=none",
                                "data.generated_samples=6", "data.block_size=32",
                                f"data.generated_share={share}",
                                "blockwise.samples=4", "blockwise.seq_len=32"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["steps"] == 2 and math.isfinite(metrics["ppl"])
    assert len(list((Path(__import__("os").environ["QAT_CACHE"]) / "generated").glob("*"))) >= 1
