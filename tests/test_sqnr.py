"""SQNR: ~6 dB per bit on Gaussian weights, infinite on the grid, per-layer tables and the callback."""
import json
import math

import pytest
import torch
from torch import nn

from qat.eval.sqnr import output_sqnr, sqnr_db, sqnr_table, weight_sqnr
from qat.quant import FakeQuantLinear, QuantConfig, WeightSpec, prepare


def gaussian_layer(spec, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(256, 256, bias=False)
    nn.init.normal_(linear.weight)
    return FakeQuantLinear.from_linear(linear, spec)


def weight_db(layer):
    return sqnr_db(layer.weight, layer.weight_fake_quant.dequantized(layer.weight))


def test_sqnr_db_by_hand():
    x = torch.tensor([3.0, 4.0])  # |x|^2 = 25
    assert sqnr_db(x, x + torch.tensor([0.5, 0.0])) == pytest.approx(10 * math.log10(25 / 0.25))
    assert sqnr_db(x, x) == math.inf


@pytest.mark.parametrize("group_size", [64, None])
@pytest.mark.parametrize("symmetric", [True, False])
def test_about_six_db_per_bit_on_gaussian_weights(group_size, symmetric):
    gran = "group" if group_size else "channel"
    db = {b: weight_db(gaussian_layer(WeightSpec(bits=b, granularity=gran, group_size=group_size,
                                                 symmetric=symmetric)))
          for b in (8, 4, 2)}
    assert db[8] > db[4] + 20 and db[4] > db[2] + 10
    assert 5.5 < (db[8] - db[4]) / 4 < 6.8  # 20 log10(2) = 6.02 dB per bit


def test_weight_already_on_the_grid_is_exact():
    spec = WeightSpec(bits=4, group_size=64, symmetric=False)
    scale, zp = 2.0 ** -6, 3  # a bf16-exact scale and an in-range zero point
    codes = torch.randint(-8, 8, (32, 128), generator=torch.Generator().manual_seed(0)).float()
    codes[:, ::64], codes[:, 1::64] = -8, 7  # every group spans the full range: same scale back
    linear = nn.Linear(128, 32, bias=False)
    linear.weight.data = (codes - zp) * scale
    layer = FakeQuantLinear.from_linear(linear, spec)
    assert weight_db(layer) == math.inf
    assert sqnr_table(nn.ModuleDict({"l": layer}))[0]["weight_sqnr_db"] is None  # JSON: null


@pytest.fixture
def quantized_llama(tiny_llama):
    config = QuantConfig(weight=WeightSpec(bits=3, group_size=64),
                         overrides={"*mlp.down_proj": {"bits": 8}})
    prepare(tiny_llama, config)
    return tiny_llama


def test_table_is_worst_first_json_ready_and_leaves_the_model_alone(quantized_llama):
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))
    before = quantized_llama(input_ids=ids).logits
    quantized_llama.train()
    table = sqnr_table(quantized_llama, ids)
    json.dumps(table, allow_nan=False)
    assert len(table) == 14 and [r["weight_sqnr_db"] for r in table] == \
        sorted(r["weight_sqnr_db"] for r in table)
    assert {r["scheme"] for r in table[-2:]} == {"W8 g64 sym"}  # 8-bit layers come last
    assert all(r["output_sqnr_db"] > 0 for r in table)
    assert quantized_llama.training  # mode and quantizer flags restored
    assert torch.equal(quantized_llama.eval()(input_ids=ids).logits, before)


def test_first_layer_accumulated_equals_its_own_error(quantized_llama):
    ids = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(1))
    out = output_sqnr(quantized_llama, ids)
    first = out["model.layers.0.self_attn.q_proj"]  # its input is float in both passes
    assert first["accumulated"] == pytest.approx(first["output"], rel=1e-9)
    last = out["model.layers.1.mlp.down_proj"]  # error from every earlier layer piles up
    assert last["accumulated"] < last["output"]


def test_callback_logs_and_writes_sqnr_json(quantized_llama, tmp_path):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger
    from torch.utils.data import DataLoader

    from qat.lightning.callbacks import SQNRCallback
    from qat.lightning.module import OptimSpec, QATModule

    ids = torch.randint(0, 300, (4, 32), generator=torch.Generator().manual_seed(0))
    loader = DataLoader([{"input_ids": row} for row in ids], batch_size=2)
    callback = SQNRCallback(tmp_path)
    trainer = L.Trainer(logger=CSVLogger(tmp_path, name="log"), callbacks=[callback],
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.validate(QATModule(quantized_llama, OptimSpec()), dataloaders=loader, verbose=False)
    saved = json.loads((tmp_path / "sqnr.json").read_text())
    assert saved["layers"] == callback.last_table and len(saved["layers"]) == 14
    import csv

    with open(next((tmp_path / "log").rglob("metrics.csv"))) as f:
        logged = [r for r in csv.DictReader(f) if r.get("sqnr/min")][0]
    expected = weight_sqnr(quantized_llama)
    assert float(logged["sqnr/model.layers.1.mlp.up_proj"]) == pytest.approx(
        expected["model.layers.1.mlp.up_proj"], abs=1e-3)
    assert float(logged["sqnr/min"]) == pytest.approx(min(expected.values()), abs=1e-3)
