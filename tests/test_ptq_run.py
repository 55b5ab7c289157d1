"""PTQ inside train.py: quant.init, PTQ-only runs that export, and the mixed-precision budget."""
import json
from pathlib import Path

import pytest

from qat.train import ConfigError, train
from qat.ptq import bits_per_weight
from conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "qat" / "conf"
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
        "ptq.calibration_samples=16", "ptq.seq_len=64", "ptq.progress=false"]


def test_ptq_only_run_exports_and_reloads_like_a_qat_run(tmp_path):
    cfg = compose_train(TINY + ["recipe=gptq_w3g128", "trainer.max_steps=0", "export.enabled=true"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["steps"] == 0
    assert metrics["export_ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)
    report = json.loads((tmp_path / "ptq_report.json").read_text())
    assert report["method"] == "gptq" and report["samples"] == 16


def test_gptq_init_then_qat_trains_from_the_calibrated_grid(tmp_path):
    from qat.models.checkpoint import model_from_checkpoint
    from qat.quant import FakeQuantLinear

    cfg = compose_train(TINY + ["recipe=awq_w4g128", "trainer.max_steps=2"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["steps"] == 2
    model, _, _ = model_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")  # static grid loads
    layers = [m for m in model.modules() if isinstance(m, FakeQuantLinear)]
    assert layers and all(m.weight_fake_quant.static for m in layers)


def test_budget_bits_is_met(tmp_path):
    cfg = compose_train(TINY + ["recipe=w4g128", "model.num_layers=4", "trainer.max_steps=0",
                                "quant.budget_bits=3.6", "quant.budget_choices=[2,3,4]",
                                "eval.fp_ppl=false"])
    metrics = train(cfg, run_dir=tmp_path)
    layers = json.loads((tmp_path / "quant_report.json").read_text())["layers"]
    shapes = {"q_proj": 128 * 128, "k_proj": 64 * 128, "v_proj": 64 * 128, "o_proj": 128 * 128,
              "gate_proj": 256 * 128, "up_proj": 256 * 128, "down_proj": 128 * 256}
    total = bits = 0
    for name, scheme in layers.items():
        n = shapes[name.rsplit(".", 1)[1]]
        width = int(scheme.split()[0][1:])
        total, bits = total + n, bits + n * bits_per_weight(width, 128, True)
    assert bits / total <= 3.6
    assert metrics["bits_per_weight"] == pytest.approx(bits / total)  # what the run reports
    assert len(set(layers.values())) >= 2  # 4 equal blocks cannot all take one width at 3.6


@pytest.mark.parametrize("override, field", [
    ("quant.init=gptqq", "quant.init"), ("quant.budget_bits=12", "quant.budget_bits"),
    ("ptq.damp=0", "ptq.damp"), ("ptq.calibration_samples=0", "ptq.calibration_samples"),
])
def test_bad_ptq_values_are_named(tmp_path, override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        train(compose_train(TINY + ["recipe=w4g128", override]), run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_outlier_layers_are_reported_and_protected(tmp_path):
    cfg = compose_train(TINY + ["recipe=w4g128", "trainer.max_steps=0", "eval.fp_ppl=false",
                                "ptq.outliers=protect", "ptq.outlier_threshold=2.0"])
    train(cfg, run_dir=tmp_path)
    outliers = json.loads((tmp_path / "outliers.json").read_text())
    layers = json.loads((tmp_path / "quant_report.json").read_text())["layers"]
    assert outliers, "a threshold of 2 must find features in the tiny model's activations"
    for name, scheme in layers.items():
        assert scheme.startswith("W8" if name in outliers else "W4"), (name, scheme)


def test_float_baseline_of_a_ptq_run_is_the_unquantized_model(tmp_path):
    plain = train(compose_train(TINY + ["recipe=w4g128", "trainer.max_steps=0"]),
                  run_dir=tmp_path / "rtn")
    gptq = train(compose_train(TINY + ["recipe=gptq_w4g128", "trainer.max_steps=0"]),
                 run_dir=tmp_path / "gptq")
    assert gptq["fp_ppl"] == pytest.approx(plain["fp_ppl"], rel=1e-6)  # GPTQ moved the weights after
