"""End-to-end runs through Hydra's compose API on the tiny model and corpus."""
import json
import re
from pathlib import Path

import pytest
import torch

from qat.train import ConfigError, train
from qat.quant import FakeQuantLinear
from conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "qat" / "conf"
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=csv", "trainer.enable_progress_bar=false"]


def test_tiny_qat_run_lowers_the_loss_and_writes_its_outputs(tmp_path):
    cfg = compose_train(TINY + ["recipe=w4g128", "trainer.max_steps=25", "optim.lr=3e-3",
                                "optim.warmup_steps=2"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["last_loss"] < metrics["first_loss"] - 0.5
    assert metrics["steps"] == 25
    assert metrics["ppl"] < metrics["fp_ppl"]  # trained on the same distribution
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["ppl"] == pytest.approx(metrics["ppl"]) and "fp_ppl" in written
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "logs" / "metrics.csv").is_file()
    report = json.loads((tmp_path / "quant_report.json").read_text())
    assert set(report["layers"].values()) == {"W4 g128 sym"} and report["float"] == ["lm_head"]


def test_checkpoint_loads_safely_and_holds_config_and_scales(tmp_path):
    cfg = compose_train(TINY + ["recipe=w2g64", "trainer.max_steps=3"])
    train(cfg, run_dir=tmp_path)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["qat"]["config"]["quant"]["weight"]["bits"] == 2
    scales = [k for k in ckpt["state_dict"] if k.endswith("weight_fake_quant.scale")]
    assert len(scales) == 14  # LSQ scales are parameters, saved with the weights


def test_learned_scales_move_and_get_their_own_lr(tmp_path):
    from qat.models.checkpoint import model_from_checkpoint

    cfg = compose_train(TINY + ["recipe=w2g64", "trainer.max_steps=4", "optim.scale_lr=1e-2"])
    train(cfg, run_dir=tmp_path)
    model, _, _ = model_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    layer = next(m for m in model.modules() if isinstance(m, FakeQuantLinear))
    initial = layer.weight_fake_quant._minmax_qparams(layer.weight)[0]
    assert not torch.allclose(layer.weight_fake_quant.scale, initial)


def test_float_baseline_and_zero_steps(tmp_path):
    metrics = train(compose_train(TINY + ["recipe=float", "trainer.max_steps=2"]), run_dir=tmp_path / "f")
    assert metrics["scheme"] == "float"
    metrics = train(compose_train(TINY + ["trainer.max_steps=0"]), run_dir=tmp_path / "q")
    assert metrics["steps"] == 0 and metrics["ppl"] > 0
    assert (tmp_path / "q" / "checkpoints" / "last.ckpt").is_file()


def test_quant_start_step_trains_in_float_first(tmp_path):
    cfg = compose_train(TINY + ["quant.start_step=2", "trainer.max_steps=4", "quant.weight.group_size=32"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["steps"] == 4


@pytest.mark.parametrize("override,message", [
    ("quant.weight.group_size=96", r"group_size=96 does not divide in_features=128 of layer 'model\.layers\.0"),
    ("quant.include=[nothing.*]", r"quant\.include pattern 'nothing\.\*' matches no Linear"),
    ("model.path=/nonexistent/model", r"model\.path"),
    ("quant.weight.bits=9", r"quant\.weight\.bits"),
])
def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, override, message):
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # as Hydra creates it before the job starts
    with pytest.raises(ConfigError, match=message):
        train(compose_train(TINY + [override]), run_dir=run_dir)
    assert not run_dir.exists()


def test_train_py_runs_from_the_command_line(tmp_path):
    import subprocess
    import sys

    root = CONF.parents[1]
    out = subprocess.run([sys.executable, str(root / "train.py"), *TINY, "trainer.max_steps=2",
                          "trainer.enable_progress_bar=true", "eval.cache_fp_ppl=false",
                          f"hydra.run.dir={tmp_path}/run"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== qat summary ==" in out.stdout
    assert "litlogger" not in out.stdout + out.stderr  # Lightning's advert line is dropped
    # the training bar counts optimizer steps (Lightning's own reads "Epoch 0/-2" here); the
    # passes before training (float ppl) show bars too
    assert "Epoch 0" not in out.stdout + out.stderr and "LeafSpec" not in out.stderr
    assert re.search(r"train: 100%.*\| 2/2 ", out.stdout), out.stdout[-2000:]
    assert "float ppl: 100%" in out.stderr
    summary = out.stdout.split("== qat summary ==")[1]
    assert f"{tmp_path}/run/checkpoints/last.ckpt" in summary
    assert f"{tmp_path}/run/metrics.json" in summary
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    typo = subprocess.run([sys.executable, str(root / "train.py"), *TINY, "+trainer.max_step=2",
                           f"hydra.run.dir={tmp_path}/typo"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert typo.returncode == 2 and "did you mean max_steps" in typo.stderr
    assert not (tmp_path / "typo").exists()
    bad = subprocess.run([sys.executable, str(root / "train.py"), *TINY, "quant.weight.bits=12",
                          f"hydra.run.dir={tmp_path}/bad"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert bad.returncode == 2 and "quant.weight.bits=12" in bad.stderr
    assert not (tmp_path / "bad").exists()


def test_float_ppl_is_cached_per_weights_and_tokens(tmp_path):
    """eval.kl=false: the float perplexity alone, cached in fp_ppl/ (with eval.kl it comes from
    the cached top-k reference's pass: tests/test_divergence.py)."""
    import os

    cache = Path(os.environ["QAT_CACHE"]) / "fp_ppl"
    first = train(compose_train(TINY + ["trainer.max_steps=0", "model.seed=7", "eval.kl=false"]),
                  run_dir=tmp_path / "a")
    entries = {p: json.loads(p.read_text()) for p in cache.glob("*.json")}
    ours = [p for p, v in entries.items() if v["fp_ppl"] == first["fp_ppl"]]
    assert len(ours) == 1
    ours[0].write_text(json.dumps({"fp_ppl": 123.0}))  # the next run must read, not recompute
    again = train(compose_train(TINY + ["trainer.max_steps=0", "model.seed=7", "eval.kl=false"]),
                  run_dir=tmp_path / "b")
    assert again["fp_ppl"] == 123.0
    other = train(compose_train(TINY + ["trainer.max_steps=0", "model.seed=8", "eval.kl=false"]),
                  run_dir=tmp_path / "c")
    assert other["fp_ppl"] != 123.0  # other weights, other entry
    fresh = train(compose_train(TINY + ["trainer.max_steps=0", "model.seed=7", "eval.cache_fp_ppl=false",
                                        "eval.kl=false"]),
                  run_dir=tmp_path / "d")
    assert fresh["fp_ppl"] == pytest.approx(first["fp_ppl"])


def test_gradient_checkpointing_trains_the_same_model(tmp_path):
    """Recomputing each block in backward changes memory, not results."""
    args = TINY + ["recipe=w4g64_kd", "blockwise=none", "trainer.max_steps=3", "optim.lr=1e-3",
                   "eval.fp_ppl=false", "export.enabled=false", "logger=none"]
    plain = train(compose_train(args), run_dir=tmp_path / "plain")
    checkpointed = train(compose_train(args + ["model.gradient_checkpointing=true"]),
                         run_dir=tmp_path / "checkpointed")
    assert checkpointed["last_loss"] == plain["last_loss"] and checkpointed["ppl"] == plain["ppl"]
