"""export=true at the end of a run, `python -m qat.export` from a checkpoint, and the generate CLI."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from qat.train import ConfigError, train
from conftest import compose_train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    cfg = compose_train(TINY + ["recipe=w4g128", "trainer.max_steps=6", "export.enabled=true"])
    return run_dir, train(cfg, run_dir=run_dir)


def test_export_ppl_matches_the_run(exported_run):
    run_dir, metrics = exported_run
    assert (run_dir / "export" / "config.json").is_file()
    assert (run_dir / "export" / "tokenizer.json").is_file()
    # The run's ppl is measured as exported (bf16 embeddings and norms); the reload unpacks the
    # stored codes and computes in float32: equal up to float32 summation order.
    assert metrics["export_eval_backend"] == "reference"
    assert metrics["export_ppl"] == pytest.approx(metrics["ppl"], rel=1e-5)
    assert json.loads((run_dir / "metrics.json").read_text())["export_ppl"] == metrics["export_ppl"]


def test_export_cli_from_checkpoint_matches_the_run_export(exported_run, tmp_path):
    from safetensors.torch import load_file

    run_dir, _ = exported_run
    out = subprocess.run([sys.executable, "-m", "qat.export", "--ckpt",
                          str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    ours = load_file(tmp_path / "e" / "model.safetensors")
    theirs = load_file(run_dir / "export" / "model.safetensors")
    packed = [k for k in ours if k.endswith(("weight_packed", "weight_scale"))]
    assert len(packed) == 28 and all((ours[k] == theirs[k]).all() for k in packed)


def test_export_model_card_states_what_was_measured(exported_run, tmp_path):
    from safetensors.torch import load_file

    from qat.export.serving import TARGETS

    run_dir, metrics = exported_run
    card = (run_dir / "export" / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: transformers" in card
    assert f"| {metrics['fp_ppl']:.3f} | {metrics['ppl']:.3f} |" in card
    # W4 g128 symmetric: 4 bits a weight plus one bf16 scale per 128 weights
    assert "| bits per quantized weight (scales and zero points included) | 16 | 4.125 |" in card
    stored = sum(t.numel() * t.element_size()
                 for t in load_file(run_dir / "export" / "model.safetensors").values())
    assert f"| {stored / 1e6:.1f} MB |" in card
    assert "| `model.layers.*.self_attn.q_proj` | W4 g128 sym | 2 |" in card
    report = json.loads((run_dir / "export" / "serving_report.json").read_text())
    for target in TARGETS:
        assert f"| {target} | {'yes' if report[target]['servable'] else 'no'} |" in card
    assert "qat.load_quantized(" in card and "from_pretrained(" in card and "vllm serve" in card
    # the CLI's export from the checkpoint reads the run's metrics.json for the same facts
    out = subprocess.run([sys.executable, "-m", "qat.export", "--ckpt",
                          str(run_dir / "checkpoints" / "last.ckpt"), "--out", str(tmp_path / "e")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"| {metrics['ppl']:.3f} |" in (tmp_path / "e" / "README.md").read_text()


def test_export_cli_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, "-m", "qat.export", "--ckpt", str(bad), "--out",
                          str(tmp_path / "e")], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "bad.ckpt" in out.stderr and not (tmp_path / "e").exists()


def test_generate_cli_on_export(exported_run):
    run_dir, _ = exported_run
    out = subprocess.run([sys.executable, "-m", "qat.serve", str(run_dir / "export"), "The",
                          "--max-new-tokens", "8"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "tokens/s" in out.stderr and "resident" in out.stderr


def test_generate_cli_threads_choose_the_team_and_keep_the_tokens(exported_run):
    """--threads sizes torch and the native step's team (float32 + int8 table: one call per
    token), and the greedy tokens do not depend on it; a size below 1 is refused."""
    run_dir, _ = exported_run
    base = [sys.executable, "-m", "qat.serve", str(run_dir / "export"), "The", "--max-new-tokens",
            "12", "--dtype", "float32", "--embedding-bits", "8"]
    texts = []
    for threads in ([], ["--threads", "1"], ["--threads", "3"]):
        out = subprocess.run(base + threads, capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0, out.stderr[-2000:]
        texts.append(out.stdout)
    assert texts[0] == texts[1] == texts[2] and texts[0].startswith("The")
    out = subprocess.run(base + ["--threads", "0"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "--threads=0" in out.stderr


def test_serving_targets_warned_and_a_chosen_target_is_strict(tmp_path, capsys):
    cfg = compose_train(TINY + ["recipe=w4g64", "trainer.max_steps=0", "eval.fp_ppl=false",
                                "quant.weight.bits=3"])
    train(cfg, run_dir=tmp_path / "warn")
    out = capsys.readouterr().out
    assert "vllm-gpu cannot serve" in out and "vllm-cpu cannot serve" in out
    assert "3-bit weights: vLLM serves 4- and 8-bit" in out
    for target, reason in (("vllm-gpu", "3-bit weights"), ("vllm-cpu", "3-bit weights")):
        cfg = compose_train(TINY + ["recipe=w3g64", f"export.target={target}"])
        with pytest.raises(ConfigError, match=rf"(?s){target} cannot serve.*{reason}"):
            train(cfg, run_dir=tmp_path / "strict")
        assert not (tmp_path / "strict").exists()
    cfg = compose_train(TINY + ["recipe=w3g64", "export.target=vllm"])
    with pytest.raises(ConfigError, match="export.target='vllm' is not a serving target; "
                                          "allowed: null, qat, transformers, vllm-gpu, vllm-cpu"):
        train(cfg, run_dir=tmp_path / "bad")


@pytest.mark.slow
def test_default_model_576_wide_layers_are_flagged_for_marlin():
    from qat.export.serving import marlin_issues
    from qat.models import ModelSpec, load_model
    from qat.quant import QuantConfig, WeightSpec, plan

    model, _ = load_model(ModelSpec())
    issues = marlin_issues(plan(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64))).layers)
    flagged = issues["in_features 576 not divisible by 128"]
    assert len(flagged) == 6 * 30  # q k v o gate up; down_proj has in_features 1536
    assert "model.layers.0.self_attn.q_proj" in flagged
    assert not any("1536" in reason for reason in issues)


def test_export_tokenizer_names_a_class_every_admitted_transformers_knows(exported_run, tmp_path):
    from transformers import AutoTokenizer

    from qat.models.tiny import tiny_tokenizer

    run_dir, _ = exported_run
    config = json.loads((run_dir / "export" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"  # TokenizersBackend is 5.x only
    loaded, original = AutoTokenizer.from_pretrained(run_dir / "export"), tiny_tokenizer(512)
    text = "The quick brown fox, 42 times."
    assert loaded(text).input_ids == original(text).input_ids
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == \
        (original.bos_token, original.eos_token, original.pad_token)
