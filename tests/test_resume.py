"""Exact resume after SIGKILL, the resumable data order, and the divergence guard."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qat.lightning.module import DivergenceError
from conftest import compose_train
from qat.train import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
        "eval.fp_ppl=false"]
# Everything that carries state across steps: EMA observers (buffers), a gradual pruning schedule
# (masks and position in the callback), AdamW moments, warmup + cosine LR, the data position.
STATEFUL = TINY + ["quant.weight.observer=moving_average", "prune=magnitude",
                   "prune.schedule=gradual", "prune.sparsity=0.5", "prune.start_step=0",
                   "prune.end_step=6", "prune.every_n_steps=2", "optim.lr=1e-3",
                   "optim.warmup_steps=2", "checkpoint.every_n_steps=2", "trainer.max_steps=8"]

# Runs train.py, sleeping 5 s before every optimizer step after step 4 so that the test's SIGKILL
# lands mid-run, deterministically after the step-4 checkpoint (sleeping changes no number).
SLOW_AFTER_4 = """
import runpy, sys, time
from qat.lightning.module import QATModule
original = QATModule.on_train_batch_start
def slow(self, batch, batch_idx):
    if self.global_step >= 4:
        time.sleep(5)
    return original(self, batch, batch_idx)
QATModule.on_train_batch_start = slow
sys.argv = ["train.py"] + sys.argv[1:]
runpy.run_path("train.py", run_name="__main__")
"""


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _ckpt_step(path):
    try:
        return _ckpt(path)["global_step"]
    except Exception:  # being replaced right now
        return None


def test_sigkilled_run_resumes_exactly(tmp_path):
    reference = train(compose_train(STATEFUL), run_dir=tmp_path / "straight")

    run_dir = tmp_path / "killed"
    args = STATEFUL + [f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_AFTER_4, *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    step4 = run_dir / "checkpoints" / "epoch=0-step=4.ckpt"
    deadline = time.monotonic() + 120
    last = run_dir / "checkpoints" / "last.ckpt"

    def settled():  # step 4's checkpoint and last.ckpt both renamed into place
        return step4.exists() and last.exists() and _ckpt_step(last) == 4

    while not settled() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # now inside the 5 s sleep before step 5
    proc.wait()
    assert step4.exists() and proc.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()  # it really died mid-run
    # a write cut short would leave only a hidden temporary; plant one: the resume removes it
    (run_dir / "checkpoints" / ".last.ckpt.killed.tmp").write_bytes(b"half a checkpoint")

    out = subprocess.run([sys.executable, "train.py", *args, "ckpt_path=last"], cwd=ROOT, env=_env(),
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob(".*.tmp"))
    resumed = json.loads((run_dir / "metrics.json").read_text())
    assert resumed["resumed_from"].endswith("last.ckpt") and resumed["steps"] == 8
    # Exact on CPU: same ops, same order, same threads. Tolerance 0 on losses, ppl and weights.
    for key in ("first_loss", "last_loss", "ppl", "sparsity"):
        assert resumed[key] == reference[key], key
    a, b = _ckpt(tmp_path / "straight" / "checkpoints" / "last.ckpt"), \
        _ckpt(run_dir / "checkpoints" / "last.ckpt")
    assert a["qat"]["loss_history"] == b["qat"]["loss_history"] and len(a["qat"]["loss_history"]) == 8
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any("observer.min_val" in k for k in a["state_dict"])
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    masks = a["callbacks"]["PruningCallback"]["masks"]
    assert masks and all(torch.equal(m, b["callbacks"]["PruningCallback"]["masks"][n])
                         for n, m in masks.items())
    assert a["lr_schedulers"] == b["lr_schedulers"]


def test_global_batch_sampler_keeps_the_old_order_and_shards_global_batches():
    from torch.utils.data import DataLoader

    from qat.lightning.data import GlobalBatchSampler

    n, seed = 37, 3
    old = DataLoader(list(range(n)), batch_size=4, shuffle=True,
                     generator=torch.Generator().manual_seed(seed))
    single = GlobalBatchSampler(n, 4, seed)
    for epoch in range(3):
        single.set_epoch(epoch)
        assert [b.tolist() for b in old] == list(single)  # runs before this change keep their data
    ranks = [GlobalBatchSampler(n, 2, seed, rank=r, world_size=2) for r in range(2)]
    for s in ranks + [single]:
        s.set_epoch(1)
    full = list(single)[: len(ranks[0])]  # several ranks drop the last partial global batch
    assert [a + b for a, b in zip(*map(list, ranks))] == full
    resumed = GlobalBatchSampler(n, 4, seed)
    resumed.set_epoch(1)
    resumed.skip = (1, 5)
    assert list(resumed) == list(single)[5:]


def _nan_at_step(monkeypatch, steps):
    """Make the model's output NaN for the given optimizer steps (a transient blow-up)."""
    from qat.lightning.module import QATModule

    original = QATModule.training_step

    def poisoned(self, batch, batch_idx):
        if self.global_step not in steps:
            return original(self, batch, batch_idx)
        hook = self.model.get_input_embeddings().register_forward_hook(
            lambda m, i, out: out * float("nan"))
        try:
            return original(self, batch, batch_idx)
        finally:
            hook.remove()

    monkeypatch.setattr(QATModule, "training_step", poisoned)


def test_nan_loss_stops_naming_the_step_and_last_good_checkpoint(tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, {5})
    cfg = compose_train(TINY + ["trainer.max_steps=8", "checkpoint.every_n_steps=2"])
    with pytest.raises(DivergenceError, match=r"train/loss is nan at step 5.*last good checkpoint "
                                              r"is .*epoch=0-step=4\.ckpt \(step 4\)"):
        train(cfg, run_dir=tmp_path)
    assert not (tmp_path / "metrics.json").exists()
    assert _ckpt(tmp_path / "checkpoints" / "epoch=0-step=4.ckpt")["global_step"] == 4


def test_skip_nonfinite_skips_the_update_and_finishes(tmp_path, monkeypatch):
    _nan_at_step(monkeypatch, {2})
    cfg = compose_train(TINY + ["trainer.max_steps=4", "guard.skip_nonfinite=true"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["skipped_steps"] == [2] and metrics["steps"] == 4
    weights = _ckpt(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.parametrize("init", ["gptq", "awq"])
def test_resume_of_a_calibrated_run_skips_calibration_and_ends_identical(tmp_path, monkeypatch,
                                                                         init):
    """The checkpoint holds what calibration wrote (GPTQ weights, AWQ's folded norm scales and
    grids): a resumed run must not calibrate again, and must end where the straight run ends."""
    import qat.train.run as run

    args = TINY + [f"quant.init={init}", "ptq.calibration_samples=8", "optim.lr=1e-3",
                   "checkpoint.every_n_steps=2", "trainer.max_steps=4"]
    straight = train(compose_train(args), run_dir=tmp_path / "straight")
    step2 = tmp_path / "straight" / "checkpoints" / "epoch=0-step=2.ckpt"
    assert step2.exists() and "ptq_seconds" in straight

    def no_calibration(*a, **k):
        raise AssertionError("calibration ran again on resume")

    monkeypatch.setattr(run, "quantize_model", no_calibration)
    resumed = train(compose_train(args + [f"ckpt_path='{step2}'"]), run_dir=tmp_path / "resumed")
    assert resumed["steps"] == 4 and "ptq_seconds" not in resumed
    for key in ("last_loss", "ppl"):
        assert resumed[key] == straight[key], key
    a = _ckpt(tmp_path / "straight" / "checkpoints" / "last.ckpt")["state_dict"]
    b = _ckpt(tmp_path / "resumed" / "checkpoints" / "last.ckpt")["state_dict"]
    assert a.keys() == b.keys() and any(k.endswith("weight_fake_quant.scale") for k in a)
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
