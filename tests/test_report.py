"""`python -m qat.report` on a hand-made sweep of the tiny model: the numbers, the table, the PNG."""
import json

import pytest

from qat.eval.report import parse_scheme
from qat.quant import WeightSpec
from qat.report.__main__ import main

LAYERS = [f"model.layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
# model=tiny defaults: 14 Linears with 294,912 weights; 512 x 128 tied embedding; 5 norms of 128
TINY_LINEAR, TINY_TOTAL = 294_912, 294_912 + 512 * 128 + 5 * 128


def write_run(root, name, metrics, scheme=None, hydra_model=None):
    run = root / name
    run.mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps({"model": "tiny", "steps": 10, **metrics}))
    if scheme:
        (run / "quant_report.json").write_text(json.dumps(
            {"layers": {n: scheme for n in LAYERS}, "float": ["lm_head"]}))
    if hydra_model:
        (run / ".hydra").mkdir()
        (run / ".hydra" / "config.yaml").write_text(
            "seed: 0\nmodel:\n  _target_: qat.models.ModelSpec\n  name: tiny\n"
            + "".join(f"  {k}: {v}\n" for k, v in hydra_model.items()) + "  seed: ${seed}\n")
    return run


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun" / "2026-01-01_00-00-00"
    write_run(root, "0_float", {"recipe": "float", "scheme": "float", "fp_ppl": 20.0, "ppl": 20.0})
    write_run(root, "1_w8", {"recipe": "w8", "scheme": "14 x W8 per-channel sym", "fp_ppl": 20.0,
                             "ppl": 20.1, "ptq_ppl": 20.3},
              "W8 per-channel sym", hydra_model={"hidden_size": 64, "intermediate_size": 128})
    write_run(root, "2_w4g64a", {"recipe": "w4g64a", "scheme": "14 x W4 g64 asym", "fp_ppl": 20.0,
                                 "ppl": 23.0, "ptq_ppl": 30.0}, "W4 g64 asym")
    write_run(root, "10_w2g64", {"recipe": "w2g64", "scheme": "14 x W2 g64 sym", "fp_ppl": 20.0,
                                 "ppl": 500.0, "ptq_ppl": 5.0e4, "export_bytes": 123_456},
              "W2 g64 sym")
    return root


def test_parse_scheme():
    assert parse_scheme("W4 g64 asym") == WeightSpec(bits=4, group_size=64, symmetric=False)
    assert parse_scheme("W8 per-channel sym + A8 per-token sym dynamic") == \
        WeightSpec(bits=8, granularity="channel", group_size=None)
    assert parse_scheme("float") is None


def test_report_numbers(sweep, capsys):
    assert main([str(sweep)]) == 0
    runs = json.loads((sweep / "report.json").read_text())["runs"]
    assert [r["run"] for r in runs] == ["0_float", "1_w8", "2_w4g64a", "10_w2g64"]  # natural order
    fl, w8, w4, w2 = runs
    assert fl["size_bytes"] == TINY_TOTAL * 2 and fl["bits_per_weight"] == 16
    # W4 g64 asym: codes 4 bits, bf16 scale per 64, 4-bit zero point per 64: 4.3125 bits
    assert w4["bits_per_weight"] == 4.3125 and w4["size_source"] == "predicted"
    assert w4["size_bytes"] == TINY_LINEAR * 4.3125 / 8 + 14 * 16 + (TINY_TOTAL - TINY_LINEAR) * 2
    assert w4["recovered"] == pytest.approx(0.7) and w4["vs_float_pct"] == pytest.approx(15.0)
    # run 1 trained a narrower tiny model (its .hydra/config.yaml): 73,728 Linear weights in
    # 1,024 rows, one bf16 scale each; 106,816 parameters in all
    assert w8["size_bytes"] == 73_728 + 1_024 * 2 + 14 * 16 + (106_816 - 73_728) * 2
    assert w2["size_bytes"] == 123_456 and w2["size_source"] == "export dir"
    md = (sweep / "report.md").read_text()
    assert "| 2_w4g64a | w4g64a | 14 x W4 g64 asym | 4.312 |" in md and "70%" in md
    assert "+15.0%" in md and "![ppl vs size](report.png)" in md
    assert "report.png" in capsys.readouterr().out


def test_report_png_is_a_readable_image(sweep):
    from matplotlib.image import imread

    assert main([str(sweep)]) == 0
    data = (sweep / "report.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    image = imread(sweep / "report.png")
    assert image.shape[0] > 300 and image.shape[1] > 500 and image.std() > 0  # not blank


def test_empty_sweep_is_an_error(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no metrics.json" in capsys.readouterr().err


def test_quality_metrics_come_from_the_run_or_its_evaluation_and_can_be_plotted(sweep, capsys):
    """KL, top-1 and cloze columns: from metrics.json (the run's final evaluation), else from a
    qat-eval of the run's export (export/eval.json); --metric plots one of them against size."""
    from matplotlib.image import imread

    w4 = sweep / "2_w4g64a" / "metrics.json"
    w4.write_text(json.dumps({**json.loads(w4.read_text()), "kl_mean": 0.25, "kl_p99": 1.5,
                              "top1": 0.8, "cloze_acc": 0.4, "fp_cloze_acc": 0.6}))
    (sweep / "10_w2g64" / "export").mkdir()
    (sweep / "10_w2g64" / "export" / "eval.json").write_text(json.dumps({
        "results": {"eval": {"ppl": 500.0, "kl_mean": 2.0, "kl_p99": 9.0, "top1": 0.3,
                             "cloze_acc": 0.1}, "ood": {"kl_mean": 7.0}},
        "reference": {"results": {"eval": {"ppl": 20.0, "cloze_acc": 0.5}}}}))
    assert main([str(sweep), "--metric", "kl_mean"]) == 0
    runs = {r["run"]: r for r in json.loads((sweep / "report.json").read_text())["runs"]}
    assert (runs["2_w4g64a"]["kl_mean"], runs["2_w4g64a"]["top1"]) == (0.25, 0.8)
    assert (runs["10_w2g64"]["kl_mean"], runs["10_w2g64"]["cloze_acc"]) == (2.0, 0.1)  # in-domain
    assert runs["10_w2g64"]["fp_cloze_acc"] == 0.5 and runs["1_w8"]["kl_mean"] is None
    md = (sweep / "report.md").read_text()
    assert "| KL mean | KL p99 | top-1 | cloze |" in md and "| 0.2500 | 1.5000 | 80.0% | 40.0% |" in md
    assert "![kl_mean vs size](report_kl_mean.png)" in md
    image = imread(sweep / "report_kl_mean.png")
    assert image.shape[0] > 300 and image.std() > 0
    assert main([str(sweep), "--metric", "bleu"]) == 2
    assert "--metric bleu: one of ppl, kl_mean" in capsys.readouterr().err
    (sweep / "10_w2g64" / "export" / "eval.json").unlink()
    w4.write_text(json.dumps({k: v for k, v in json.loads(w4.read_text()).items()
                              if k != "cloze_acc"}))
    assert main([str(sweep), "--metric", "cloze_acc"]) == 2
    assert "no run under" in capsys.readouterr().err
