"""`python -m qat.eval` on a float model, a training run and its export (tiny model, tiny corpus)."""
import json
import math

import pytest
import torch

from qat.eval.__main__ import main

TINY_SETS = ["--data", "tiny", "--ood", "tiny", "--ood-fraction", "0.1", "--window", "64",
             "--windows", "8", "--ood-windows", "4"]


def run_cli(args, tmp_path):
    out = tmp_path / "eval.json"
    assert main(list(args) + ["--json", str(out)]) == 0
    return json.loads(out.read_text())


def by_hand_ppl(model, ids, window, n_windows):
    """exp(mean token NLL), one window at a time, log-softmax and gather written out."""
    nlls = []
    with torch.no_grad():
        for w in range(n_windows):
            x = ids[w * window:(w + 1) * window]
            logp = torch.log_softmax(model(x[None]).logits[0].double(), dim=-1)  # (T, V)
            nlls.append(-logp[torch.arange(window - 1), x[1:]])
    return math.exp(torch.cat(nlls).mean().item())


def test_float_model_matches_a_direct_computation(tmp_path, capsys):
    from qat.data import DataSpec
    from qat.lightning.data import TextDataModule
    from qat.models import ModelSpec, load_model

    out = run_cli(["tiny"] + TINY_SETS, tmp_path)
    model, tokenizer = load_model(ModelSpec(name="tiny"))
    data = TextDataModule(DataSpec(name="tiny", eval_window=64, eval_windows=8, ood="tiny",
                                   ood_fraction=0.1, ood_windows=4), tokenizer)
    data.setup()
    eval_r, ood_r = out["results"]["eval"], out["results"]["ood"]
    assert out["kind"] == "float" and eval_r["n_tokens"] == data.eval_blocks.shape[0] * 63
    assert eval_r["ppl"] == pytest.approx(by_hand_ppl(model, data.eval_ids, 64, 8), rel=1e-5)
    assert ood_r["n_windows"] == 4 and ood_r["corpus"] == "tiny"
    assert ood_r["ppl"] == pytest.approx(by_hand_ppl(model, data.ood_ids, 64, 4), rel=1e-5)
    assert ood_r["ppl"] != pytest.approx(eval_r["ppl"])  # the 10% split is not the 5% one
    printed = capsys.readouterr().out
    assert "ppl" in printed and f"{eval_r['ppl']:.4f}" in printed


def test_run_dir_reproduces_the_runs_ppl(tiny_run, tmp_path):
    run_dir, metrics = tiny_run
    out = run_cli([str(run_dir), "--data", "tiny", "--ood", "none", "--window", "64",
                   "--windows", "8"], tmp_path)
    assert out["kind"] == "run" and list(out["results"]) == ["eval"]
    assert out["results"]["eval"]["ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)


def test_export_dir_matches_the_run(tiny_run, tmp_path):
    from qat.models.checkpoint import model_from_checkpoint
    from qat.export.writer import export_model

    run_dir, metrics = tiny_run
    model, tokenizer, _ = model_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    export_model(model, tokenizer, tmp_path / "export")
    out = run_cli([str(tmp_path / "export"), "--data", "tiny", "--ood", "none", "--window", "64",
                   "--windows", "8"], tmp_path)
    assert out["kind"] == "export"
    # bf16 embeddings and norms in both; float32 summation order differs in the int4 kernel
    assert out["results"]["eval"]["ppl"] == pytest.approx(metrics["ppl"], rel=1e-4)


def test_bad_source_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path)] + TINY_SETS) == 2
    assert "checkpoints/last.ckpt" in capsys.readouterr().err


def test_report_reads_a_real_run(tiny_run):
    from qat.eval.report import build_report

    run_dir, metrics = tiny_run
    rows, baseline = build_report(run_dir)
    (row,) = rows
    assert (row.run, row.recipe, row.ppl) == (".", metrics["recipe"], metrics["ppl"])
    # W4 g128 sym; the run exported (export.enabled is on by default): its size is measured
    assert row.bits_per_weight == 4.125 and row.size_source == "export"


def test_a_run_and_its_export_are_as_far_from_the_float_model(tiny_run, tmp_path, monkeypatch,
                                                                capsys):
    """--reference: KL to the float model and top-1 agreement next to perplexity; the run (fake
    quantization) and its export (packed codes, exact float32 kernels) give the same numbers,
    the float model itself 0 and 1."""
    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    run_dir, _ = tiny_run
    ref = ["--reference", "tiny", "--kl-top-k", "64", "--backend", "reference"]
    run = run_cli([str(run_dir)] + TINY_SETS + ref, tmp_path)
    export = run_cli([str(run_dir / "export")] + TINY_SETS + ref, tmp_path)
    same = run_cli(["tiny"] + TINY_SETS + ref, tmp_path)
    assert "KL mean" in capsys.readouterr().out
    for name in ("eval", "ood"):
        a, b, c = (out["results"][name] for out in (run, export, same))
        assert c["kl_max"] < 1e-5 and c["top1"] == 1.0 and c["kl_top_k"] == 64
        assert a["kl_mean"] > 1e-4 and a["kl_mean"] <= a["kl_p99"] <= a["kl_max"]
        assert a["n_tokens"] == b["n_tokens"] == c["n_tokens"]
        for key in ("kl_mean", "kl_p99", "kl_max"):
            assert b[key] == pytest.approx(a[key], rel=1e-3), (name, key)
        assert abs(b["top1"] - a["top1"]) <= 2 / a["n_tokens"]  # a near-tie may flip


def test_kl_needs_a_float_reference_and_a_positive_top_k(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    assert main([str(run_dir), *TINY_SETS, "--reference", str(run_dir)]) == 2
    assert "--reference" in capsys.readouterr().err
    assert main([str(run_dir), *TINY_SETS, "--reference", "tiny", "--kl-top-k", "0"]) == 2
    assert "--kl-top-k 0" in capsys.readouterr().err


def test_by_default_the_distance_is_to_the_model_the_run_was_made_from(tiny_run, capsys):
    """No --reference: a run compares with its model spec's float model, its export with the
    one its card names; eval.json lands beside each, and the run's own final evaluation (KL,
    top-1, cloze, measured on the model as exported) is what qat-eval finds for the run."""
    run_dir, metrics = tiny_run
    args = ["--data", "tiny", "--ood", "none", "--window", "64", "--windows", "8",
            "--kl-top-k", "64", "--backend", "reference"]
    assert main([str(run_dir), *args]) == 0
    assert main([str(run_dir / "export"), *args]) == 0
    run = json.loads((run_dir / "eval.json").read_text())
    export = json.loads((run_dir / "export" / "eval.json").read_text())
    assert str(run_dir / "eval.json") in capsys.readouterr().out
    for out in (run, export):
        assert out["reference"]["source"] == "tiny"
        assert out["reference"]["results"]["eval"]["ppl"] == pytest.approx(metrics["fp_ppl"],
                                                                            rel=1e-6)
    a, b = run["results"]["eval"], export["results"]["eval"]
    for key in ("kl_mean", "kl_p99", "kl_max"):
        assert a[key] == pytest.approx(metrics[key], rel=1e-5), key
        assert b[key] == pytest.approx(metrics[key], rel=1e-3), key
    assert a["top1"] == metrics["top1"] and abs(b["top1"] - a["top1"]) <= 2 / a["n_tokens"]
    assert a["cloze_acc"] == metrics["cloze_acc"] and a["cloze_items"] == metrics["cloze_items"]
    assert run["reference"]["results"]["eval"]["cloze_acc"] == metrics["fp_cloze_acc"]
    card = (run_dir / "export" / "README.md").read_text()
    assert f"{metrics['kl_mean']:.4f}" in card and "top-1 token agreement" in card


def test_no_reference_no_distance_and_a_bad_out_is_refused_first(tiny_run, tmp_path, capsys):
    run_dir, _ = tiny_run
    out = run_cli([str(run_dir), *TINY_SETS, "--reference", "none", "--cloze", "0"], tmp_path)
    assert "reference" not in out
    assert not any(k.startswith(("kl_", "top1", "cloze")) for r in out["results"].values()
                   for k in r)
    blocked = tmp_path / "file"
    blocked.write_text("")
    assert main([str(run_dir), *TINY_SETS, "--out", str(blocked / "eval.json")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main([str(run_dir), *TINY_SETS, "--cloze", "-1"]) == 2
    assert "--cloze -1" in capsys.readouterr().err


def test_a_run_with_an_ood_set_measures_it_as_qat_eval_does(tmp_path, monkeypatch):
    """data.ood: the run's final evaluation adds the out-of-domain perplexity, KL, top-1 and
    cloze of the model as exported, and the float model's, equal to qat-eval's on that set."""
    from conftest import compose_train

    from qat.train import train

    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    metrics = train(compose_train(["model=tiny", "data=tiny", "logger=none",
                                   "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                                   "recipe=w4g128", "eval.kl_top_k=64", "data.ood=tiny",
                                   "data.ood_fraction=0.1", "data.ood_windows=4"]),
                    run_dir=tmp_path / "run")
    out = run_cli([str(tmp_path / "run"), *TINY_SETS, "--kl-top-k", "64"], tmp_path)
    ood, fp = out["results"]["ood"], out["reference"]["results"]["ood"]
    assert metrics["ood_ppl"] == pytest.approx(ood["ppl"], rel=1e-5)
    assert metrics["fp_ood_ppl"] == pytest.approx(fp["ppl"], rel=1e-6)
    assert metrics["ood_ppl"] != pytest.approx(metrics["ppl"])  # another set
    for key in ("kl_mean", "kl_p99", "top1", "cloze_acc"):
        assert metrics[f"ood_{key}"] == pytest.approx(ood[key], rel=1e-5), key
    assert metrics["fp_ood_cloze_acc"] == fp["cloze_acc"]


def test_a_run_with_validation_windows_scores_them_never_having_trained_on_them(tmp_path,
                                                                                  monkeypatch):
    """data.val_windows: the float model's and the final model's perplexity (and KL) on windows
    cut from the end of the training split, the float one equal to a direct computation."""
    from conftest import compose_train

    from qat.data import DataSpec
    from qat.lightning.data import TextDataModule
    from qat.models import ModelSpec, load_model
    from qat.train import train

    monkeypatch.setenv("QAT_CACHE", str(tmp_path / "cache"))
    metrics = train(compose_train(["model=tiny", "data=tiny", "logger=none",
                                   "trainer.max_steps=2", "trainer.enable_progress_bar=false",
                                   "recipe=w4g128", "eval.kl_top_k=64", "data.val_windows=2"]),
                    run_dir=tmp_path / "run")
    model, tokenizer = load_model(ModelSpec(name="tiny"))
    data = TextDataModule(DataSpec(name="tiny", eval_window=64, block_size=64, val_windows=2),
                          tokenizer)
    data.setup()
    fp = by_hand_ppl(model, data.val_blocks.reshape(-1), 64, 2)
    assert metrics["fp_val_ppl"] == pytest.approx(fp, rel=1e-5)
    assert metrics["val_ppl"] != pytest.approx(metrics["fp_val_ppl"])  # the quantized model's
    assert metrics["val_ppl"] != pytest.approx(metrics["ppl"])  # another set
    assert metrics["val_kl_mean"] > 0 and 0 < metrics["val_top1"] <= 1
