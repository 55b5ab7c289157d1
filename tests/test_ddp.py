"""Two CPU processes (DDP, gloo) train exactly what one process with the same global batch trains."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qat.train import train
from conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]
RUN = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
       "eval.fp_ppl=false", "trainer.max_steps=6", "optim.lr=1e-3", "export.enabled=true"]


def test_ddp_two_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    one = train(compose_train(RUN + ["data.batch_size=4"]), run_dir=tmp_path / "one")
    run_dir = tmp_path / "ddp"
    out = subprocess.run([sys.executable, "train.py", *RUN, "trainer=ddp", "trainer.accelerator=cpu",
                          "trainer.devices=2", "data.batch_size=2", f"hydra.run.dir={run_dir}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("== qat summary ==") == 1  # rank zero reports, writes and exports
    two = json.loads((run_dir / "metrics.json").read_text())
    assert two["steps"] == one["steps"] == 6 and two["tokens"] == one["tokens"]
    # Gradients are averaged over ranks instead of summed over one batch: float32 rounding only.
    assert two["first_loss"] == pytest.approx(one["first_loss"], rel=1e-5)
    assert two["last_loss"] == pytest.approx(one["last_loss"], rel=1e-5)
    assert two["ppl"] == pytest.approx(one["ppl"], rel=1e-5)
    assert two["export_ppl"] == pytest.approx(one["export_ppl"], rel=1e-5)
    a = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    b = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    # Adam divides by sqrt(v): a weight whose gradient is near zero can move by a few float32
    # ulps of its update more on one side (1.05e-6 seen on an AVX2 machine); a wrong average or a
    # missed all-reduce moves weights by ~lr = 1e-3
    for key, value in a.items():
        torch.testing.assert_close(b[key], value, rtol=0, atol=1e-5, msg=key)
    assert (run_dir / "export" / "model.safetensors").is_file()


def test_multi_device_trainer_configs_compose_and_instantiate():
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy

    for name, kind in (("ddp", DDPStrategy), ("fsdp", FSDPStrategy)):
        cfg = compose_train([f"trainer={name}"])
        assert isinstance(instantiate(cfg.trainer.strategy), kind)
        assert cfg.trainer.precision == "32-true" and cfg.trainer.devices == 2
