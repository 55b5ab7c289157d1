"""Pruning inside a training run: N:M survives training and export; structured pruning shrinks."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qat.format.pack import unpack
from qat.train import train
from qat.prune import check_nm
from conftest import compose_train

CONF = Path(__file__).resolve().parents[1] / "qat" / "conf"
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false"]


def test_2of4_kd_run_exports_exactly_2of4_codes(tmp_path):
    cfg = compose_train(TINY + ["recipe=prune2of4_w4g64_kd", "trainer.max_steps=3",
                                "export.enabled=true", "optim.lr=1e-3",
                                "quant.weight.symmetric=false"])
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["nm_ok"] and metrics["export_nm_ok"] and metrics["sparsity"] == 0.5
    report = json.loads((tmp_path / "prune_report.json").read_text())
    assert len(report["layers"]) == 14 and all(v["nm_ok"] for v in report["layers"].values())
    # Read the packed integers back: a pruned weight is stored as its group's zero point.
    tensors = load_file(str(tmp_path / "export" / "model.safetensors"))
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    group = next(iter(config["quantization_config"]["config_groups"].values()))
    bits, size = group["weights"]["num_bits"], group["weights"]["group_size"]
    checked = 0
    for key in [k for k in tensors if k.endswith(".weight_packed")]:
        name = key.removesuffix(".weight_packed")
        out_f, in_f = tensors[f"{name}.weight_shape"].tolist()
        codes = unpack(tensors[key], bits, in_f).float()  # (out, in)
        zp = _zero_points(tensors, name, bits, out_f, in_f // size)
        zero = codes == zp.repeat_interleave(size, dim=1)
        assert check_nm((~zero).float(), 2, 4), name
        checked += 1
    assert checked == 14


def _zero_points(tensors, name, bits, out_f, groups):
    from qat.format.pack import unpack_zero_points

    packed = tensors.get(f"{name}.weight_zero_point")
    if packed is None:
        return torch.zeros(out_f, groups)
    return unpack_zero_points(packed, bits, out_f).float().reshape(out_f, groups)


def test_head_pruning_trains_exports_and_rebuilds_a_smaller_model(tmp_path):
    from qat.models.checkpoint import model_from_checkpoint
    from qat.export.load import load_quantized

    cfg = compose_train(TINY + ["recipe=prune50_w4g64_kd", "prune=magnitude", "prune.pattern=heads",
                                "prune.sparsity=0.5", "trainer.max_steps=2", "quant.weight.group_size=32",
                                "export.enabled=true"])
    metrics = train(cfg, run_dir=tmp_path)
    dense = compose_train(TINY + ["recipe=w4g64", "quant.weight.group_size=32", "trainer.max_steps=0",
                           "eval.fp_ppl=false", "export.enabled=true", "export.evaluate=false"])
    full = train(dense, run_dir=tmp_path / "dense")
    report = json.loads((tmp_path / "prune_report.json").read_text())
    assert report["shrink"]["config"]["num_key_value_heads"] == 1
    assert report["shrink"]["parameters_after"] < report["shrink"]["parameters_before"]
    assert metrics["export_weight_bytes"] < full["export_weight_bytes"]
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["num_attention_heads"] == 2 and config["num_key_value_heads"] == 1
    served = load_quantized(tmp_path / "export", dtype=torch.float32, backend="reference")
    model, _, _ = model_from_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert served(ids).logits.shape[-1] == model(ids).logits.shape[-1]
    assert model.config.num_attention_heads == 2


def test_float_baseline_of_a_pruned_run_is_the_unpruned_model(tmp_path):
    dense = train(compose_train(TINY + ["recipe=float", "trainer.max_steps=0"]),
                  run_dir=tmp_path / "dense")
    pruned = train(compose_train(TINY + ["recipe=float", "prune=nm", "prune.method=magnitude",
                                         "trainer.max_steps=0"]), run_dir=tmp_path / "pruned")
    assert pruned["fp_ppl"] == pytest.approx(dense["fp_ppl"], rel=1e-6)
    assert pruned["ppl"] != pytest.approx(dense["ppl"], rel=1e-3)  # the pruned model is scored
    assert pruned["sparsity"] == 0.5
