"""Block-wise QAT: the learned grid's gradients, the block stage, its export and its resume."""
import copy
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import compose_train
from qat.format.grid import qrange
from qat.blockwise import BlockwiseSpec, train_blocks
from qat.models.placement import native_bf16
from qat.export.load import load_quantized
from qat.export.writer import export_model
from qat.train import ConfigError, train
from qat.quant import QuantConfig, WeightSpec, fake_quant_modules, prepare
from qat.quant.ste import fake_quant_linear

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
        "eval.fp_ppl=false", "blockwise=default", "blockwise.samples=8", "blockwise.seq_len=64",
        "blockwise.epochs=2", "blockwise.lr=1e-4", "blockwise.scale_lr=1e-4",
        "blockwise.zero_point_lr=1e-2", "blockwise.progress=false", "recipe=w4g128",
        "quant.weight.symmetric=false", "eval.stage_ppl=false"]


def _reference_grads(x, w, scale, zp, g, bits):
    """dL/ds and dL/dzp of L = sum(g * x @ w_hat^T), straight from the estimator's definition, in
    float64: inside the range w_hat = w (so dw_hat/ds = (q - zp) - w/s, dw_hat/dzp = 0), outside
    it w_hat = (q - zp) s with q clamped (dw_hat/ds = q - zp, dw_hat/dzp = -s)."""
    qmin, qmax = qrange(bits)
    x, w, s, z, g = (t.double() for t in (x, w, scale, zp, g))
    rows, groups = s.shape[:2]
    wg = w.view(rows, groups, -1)
    v = wg / s + z
    inside = (v >= qmin) & (v <= qmax)
    q = v.round().clamp(qmin, qmax)
    grad_w_hat = (g.reshape(-1, rows).T @ x.reshape(-1, w.shape[1])).view_as(wg)
    ds = torch.where(inside, (q - z) - wg / s, q - z)
    dz = torch.where(inside, torch.zeros_like(v), -s.expand_as(v))
    return (grad_w_hat * ds).sum(-1, keepdim=True), (grad_w_hat * dz).sum(-1, keepdim=True)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_scale_and_zero_point_get_the_estimators_gradient(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(3, 5, 64, generator=gen)
    w = torch.randn(16, 64, generator=gen)
    # a grid narrower than the weights, so that some values clamp and the zero point gets a gradient
    scale = torch.full((16, 2, 1), 0.6 / 2 ** (bits - 1)).requires_grad_(True)
    zp = torch.randint(-1, 2, (16, 2, 1), generator=gen).float().requires_grad_(True)
    g = torch.randn(3, 5, 16, generator=gen)
    (fake_quant_linear(x, w, scale, zp, None, bits) * g).sum().backward()
    want_s, want_z = _reference_grads(x, w, scale.detach(), zp.detach(), g, bits)
    assert want_z.abs().sum() > 0  # the case was not vacuous
    torch.testing.assert_close(scale.grad.double(), want_s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(zp.grad.double(), want_z, rtol=1e-4, atol=1e-4)


def test_learned_grid_trains_exactly_what_freezes():
    """learn_grid starts from the current grid bit for bit, its forward rounds exactly as stored,
    the float zero point gets the estimator's gradient through its rounding, and freeze_grid
    keeps what the last forward used."""
    from qat.quant.modules import FakeQuantLinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8, bias=False)
    layer = FakeQuantLinear.from_linear(linear, WeightSpec(bits=3, group_size=32, symmetric=False))
    x = torch.randn(4, 64)
    before = layer(x).detach()
    params = layer.weight_fake_quant.learn_grid(layer.weight)
    assert len(params) == 2 and all(p.requires_grad for p in params)
    assert torch.equal(layer(x), before)
    with torch.no_grad():  # move the grid off the stored values: forward must round them back
        params[0].mul_(1.3).add_(1e-4)
        params[1].add_(0.4)
    moved = layer(x)
    g = torch.randn_like(moved)
    (moved * g).sum().backward()
    scale_used = params[0].detach().to(torch.bfloat16).float()
    zp_used = params[1].detach().round().clamp(*qrange(3))
    want_s, want_z = _reference_grads(x, layer.weight.detach(), scale_used, zp_used, g, 3)
    torch.testing.assert_close(params[0].grad.double(), want_s, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(params[1].grad.double(), want_z, rtol=1e-4, atol=1e-4)
    layer.weight_fake_quant.freeze_grid()
    assert layer.weight_fake_quant.static and not layer.weight_fake_quant.learned_grid
    assert torch.equal(layer.weight_fake_quant.scale, scale_used)
    assert torch.equal(layer.weight_fake_quant.zero_point, zp_used)
    assert torch.equal(layer(x), moved.detach())


def test_frozen_codes_keep_the_weight_on_its_codes():
    from qat.quant.modules import FakeQuantLinear

    torch.manual_seed(0)
    layer = FakeQuantLinear.from_linear(torch.nn.Linear(64, 8), WeightSpec(bits=4, group_size=32))
    fq = layer.weight_fake_quant
    codes = fq.quantized(layer.weight)[0]
    fq.freeze_codes(layer.weight)
    (scale,) = fq.learn_grid(layer.weight, zero_point=False)
    with torch.no_grad():
        layer.weight.add_(torch.randn_like(layer.weight))  # the float weight no longer matters
        scale.mul_(1.25)
    q, s, _ = fq.quantized(layer.weight)
    assert torch.equal(q, codes)
    x = torch.randn(3, 64)
    expected = x @ ((codes.float().view(8, 2, 32) * s.unsqueeze(-1)).view(8, 64)).T + layer.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    layer(x).sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


def _tiny_quantized(tiny_llama, spec):
    float_model = copy.deepcopy(tiny_llama)
    prepare(tiny_llama, QuantConfig(weight=spec))
    return tiny_llama, float_model


@pytest.mark.parametrize("spec", [WeightSpec(bits=4, group_size=64),
                                  WeightSpec(bits=2, group_size=64, symmetric=False)],
                         ids=["w4g64", "w2g64_asym"])
def test_block_stage_lowers_every_blocks_loss(tiny_llama, spec):
    model, float_model = _tiny_quantized(tiny_llama, spec)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    report = train_blocks(model, float_model, ids, BlockwiseSpec(
        enabled=True, samples=8, batch_size=2, epochs=4, lr=1e-4, scale_lr=1e-4,
        zero_point_lr=1e-2, progress=False))
    assert [b.index for b in report.blocks] == [0, 1]
    for block in report.blocks:
        assert block.steps == 16 and block.loss_after < 0.9 * block.loss_before, block
    for m in fake_quant_modules(model):  # trained grids end static, as the exporter reads them
        assert m.weight_fake_quant.static and not m.weight_fake_quant.learned_grid


def test_block_stage_in_bfloat16_trains_like_float32(tiny_llama):
    """blockwise.compute_dtype=bfloat16 runs the training steps under autocast: the errors it
    reports stay float32 (the same before training), and it trains about as far."""
    spec = BlockwiseSpec(enabled=True, samples=8, batch_size=2, epochs=4, lr=1e-4, scale_lr=1e-4,
                         progress=False)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    reports = {}
    for dtype in ("float32", "bfloat16", "auto"):
        model, float_model = _tiny_quantized(copy.deepcopy(tiny_llama), WeightSpec(bits=4,
                                                                                   group_size=64))
        reports[dtype] = train_blocks(model, float_model, ids, replace(spec, compute_dtype=dtype),
                                      seed=0).blocks
    full, half = reports["float32"], reports["bfloat16"]
    assert full[0].loss_before == half[0].loss_before
    for a, b in zip(full, half):
        assert b.loss_after != a.loss_after  # the steps did run in bfloat16
        assert b.loss_after < 0.9 * b.loss_before
        assert b.loss_after == pytest.approx(a.loss_after, rel=0.1)
    native = "bfloat16" if native_bf16(torch.device("cpu")) else "float32"  # what auto picks
    assert [b.loss_after for b in reports["auto"]] == [b.loss_after for b in reports[native]]


def test_logit_lens_of_the_last_block_is_the_models_own_head(tiny_llama):
    """Applied to the last block's output, the lens gives the model's logits exactly."""
    from qat.blockwise.train import logit_lens

    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = tiny_llama(ids, output_hidden_states=True)
        # hidden_states[-1] already has the final norm applied; take the last block's raw output
        raw = {}
        handle = tiny_llama.model.layers[-1].register_forward_hook(
            lambda m, a, o: raw.setdefault("h", o[0] if isinstance(o, tuple) else o))
        logits = tiny_llama(ids).logits
        handle.remove()
        torch.testing.assert_close(logit_lens(tiny_llama)(raw["h"]), logits, rtol=0, atol=0)
    assert out.logits.shape == logits.shape


def test_kd_term_is_the_lens_kl_at_sampled_positions(tiny_llama):
    """The KD term is KL(float || quantized) of the lens logits at kd_tokens positions that the
    generator picks, with the gradient reaching the block output and not the float target."""
    from qat.blockwise.train import _kd_term, logit_lens
    from qat.distill.losses import ForwardKL

    lens = logit_lens(tiny_llama)
    gen = torch.Generator().manual_seed(0)
    out = torch.randn(2, 8, 128, generator=gen).requires_grad_(True)
    goal = torch.randn(2, 8, 128, generator=gen)
    spec = BlockwiseSpec(kd_tokens=5, kd_temperature=2.0)
    value = _kd_term(lens, out, goal, spec, ForwardKL(2.0), torch.Generator().manual_seed(7))
    pos = torch.randperm(16, generator=torch.Generator().manual_seed(7))[:5]
    with torch.no_grad():
        t = (lens(goal.reshape(16, 128)[pos]) / 2).log_softmax(-1)
        s = (lens(out.reshape(16, 128)[pos]) / 2).log_softmax(-1)
        want = (t.exp() * (t - s)).sum(-1).mean() * 4
    torch.testing.assert_close(value, want, rtol=1e-6, atol=1e-7)
    value.backward()
    touched = out.grad.reshape(16, 128).abs().sum(-1) > 0
    assert touched.sum() == 5 and touched[pos].all()


def test_block_stage_with_kd_term_trains_other_blocks(tiny_llama):
    spec = WeightSpec(bits=2, group_size=64, symmetric=False)
    model, float_model = _tiny_quantized(tiny_llama, spec)
    twin = copy.deepcopy(model)
    ids = torch.randint(0, 300, (8, 32), generator=torch.Generator().manual_seed(0))
    base = dict(enabled=True, samples=8, batch_size=2, epochs=4, lr=1e-3, scale_lr=1e-3,
                progress=False, kd_tokens=32)
    train_blocks(model, float_model, ids, BlockwiseSpec(**base))
    report = train_blocks(twin, float_model, ids, BlockwiseSpec(**base, kd_weight=1.0))
    for block in report.blocks:
        assert block.loss_after < 0.9 * block.loss_before, block
    w, w_kd = model.model.layers[0].mlp.up_proj.weight, twin.model.layers[0].mlp.up_proj.weight
    assert not torch.equal(w, w_kd)


def test_export_after_the_block_stage_serves_the_trained_model(tiny_llama, tmp_path):
    spec = WeightSpec(bits=3, group_size=64, symmetric=False)
    model, float_model = _tiny_quantized(tiny_llama, spec)
    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(1))
    train_blocks(model, float_model, ids, BlockwiseSpec(enabled=True, samples=4, batch_size=2,
                                                        lr=1e-3, scale_lr=1e-3, progress=False))
    probe = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = model(probe).logits
        untrained = float_model(probe).logits
    export_model(model, None, tmp_path / "export", dtype=torch.float32)
    served = load_quantized(tmp_path / "export", dtype=torch.float32, backend="reference")
    with torch.no_grad():
        logits = served(probe).logits
    torch.testing.assert_close(logits, trained, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, untrained, atol=1e-3)  # the check can tell models apart


def test_run_with_block_stage_writes_its_reports(tmp_path):
    cfg = compose_train(TINY + ["trainer.max_steps=2", "eval.stage_ppl=true", "export.enabled=true"])
    metrics = train(cfg, run_dir=tmp_path)
    section = metrics["blockwise"]
    assert section["blocks"] == 2 and section["mean_loss_after"] < section["mean_loss_before"]
    assert {"ptq_ppl", "block_ppl", "ppl"} <= set(metrics)
    assert metrics["export_ppl"] == pytest.approx(metrics["ppl"], rel=1e-4)
    per_block = json.loads((tmp_path / "blockwise_report.json").read_text())
    assert [b["index"] for b in per_block["blocks"]] == [0, 1]
    assert all(b["loss_after"] < b["loss_before"] and b["seconds"] >= 0
               for b in per_block["blocks"])


def test_block_stage_stacks_with_quant_init(tmp_path):
    cfg = compose_train(TINY + ["trainer.max_steps=0", "quant.init=gptq",
                                "ptq.calibration_samples=8", "ptq.seq_len=64"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["blockwise"]["blocks"] == 2 and (tmp_path / "ptq_report.json").exists()
    assert (tmp_path / "checkpoints" / "blockwise" / "init.safetensors").exists()


@pytest.mark.parametrize("trainable", ["scales", "all"])
def test_end_to_end_on_the_grid(tmp_path, trainable):
    """optim.trainable=scales: only scales move and every code stays; all: weights move too."""
    from qat.models.checkpoint import read_checkpoint

    cfg = compose_train(TINY + ["trainer.max_steps=3", f"optim.trainable={trainable}",
                                "optim.scale_lr=1e-2", "blockwise.epochs=1", "export.enabled=true"])
    metrics = train(cfg, run_dir=tmp_path)
    state = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert any(k.endswith("weight_fake_quant.scale") for k in state)
    assert any(k.endswith("weight_fake_quant.codes") for k in state) == (trainable == "scales")
    assert metrics["export_ppl"] == pytest.approx(metrics["ppl"], rel=1e-4)


def test_bad_blockwise_values_fail_before_work(tmp_path):
    for override, field in (("blockwise.inputs=floaty", "blockwise.inputs"),
                            ("blockwise.kd_weight=-1", "blockwise.kd_weight"),
                            ("blockwise.kd_temperature=0", "blockwise.kd_temperature"),
                            ("blockwise.kd_tokens=0", "blockwise.kd_tokens"),
                            ("blockwise.epochs=0", "blockwise.epochs"),
                            ("blockwise.compute_dtype=float16", "blockwise.compute_dtype"),
                            ("optim.trainable=everything", "optim.trainable"),
                            ("prune=nm", "prune.pattern")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            train(compose_train(TINY + [override]), run_dir=tmp_path / "bad")
        assert not (tmp_path / "bad").exists()


# Runs train.py, sleeping after block 0 is saved so that the test's SIGKILL lands in the block stage
SLOW_AFTER_BLOCK_0 = """
import runpy, sys, time
from qat.blockwise.store import BlockStore
original = BlockStore.save
def slow(self, index, block, result):
    original(self, index, block, result)
    if index == 0:
        time.sleep(60)
BlockStore.save = slow
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _state(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                      weights_only=True)["state_dict"]


def test_killed_block_stage_resumes_at_the_next_block_exactly(tmp_path):
    args = TINY + ["trainer.max_steps=2", "quant.init=rtn"]
    reference = train(compose_train(args), run_dir=tmp_path / "straight")

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.Popen([sys.executable, "-c", SLOW_AFTER_BLOCK_0, *args,
                             f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = run_dir / "checkpoints" / "blockwise" / "progress.json"

    def block0_saved():
        try:
            return len(json.loads(progress.read_text())["blocks"]) == 1
        except (OSError, ValueError, KeyError):
            return False

    deadline = time.monotonic() + 180
    while not block0_saved() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and block0_saved()
    assert not (run_dir / "checkpoints" / "last.ckpt").exists()

    resumed = train(compose_train(args + ["ckpt_path=last", f"hydra.run.dir={run_dir}"]),
                    run_dir=run_dir)
    assert resumed["blockwise"]["resumed_blocks"] == 1 and resumed["blockwise"]["blocks"] == 2
    assert resumed["ppl"] == reference["ppl"] and resumed["last_loss"] == reference["last_loss"]
    want, got = _state(tmp_path / "straight"), _state(run_dir)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("override", ["blockwise.epochs=3", "optim.trainable=scales"])
def test_block_files_of_another_config_are_refused(tmp_path, override):
    # optim.trainable=scales saves each trained block as integer codes, the others as weights:
    # a resume under the other form must name the field, not fail inside load_state_dict
    train(compose_train(TINY + ["trainer.max_steps=0", "optim.trainable=all"]), run_dir=tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(compose_train(TINY + ["trainer.max_steps=0", "optim.trainable=all", override,
                                    "ckpt_path=last"]), run_dir=tmp_path)


def test_block_files_resume_under_another_optimizer_setting(tmp_path):
    # weights and all save the same block files; lr does not shape them: both resume
    train(compose_train(TINY + ["trainer.max_steps=0", "optim.trainable=weights"]),
          run_dir=tmp_path)
    (tmp_path / "checkpoints" / "last.ckpt").unlink()
    resumed = train(compose_train(TINY + ["trainer.max_steps=0", "optim.trainable=all",
                                          "optim.lr=1e-3", "ckpt_path=last"]), run_dir=tmp_path)
    assert resumed["blockwise"]["resumed_blocks"] == resumed["blockwise"]["blocks"] > 0
