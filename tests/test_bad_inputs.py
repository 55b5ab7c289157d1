"""A catalogue of bad inputs: each gets a clear error naming the field or file, and leaves no
partial output behind (no run directory, no half-written checkpoint, export or report)."""
import errno
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from conftest import compose_train
from qat.train import ConfigError, train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["recipe=w4g64", "model=tiny", "data=tiny", "logger=none", "trainer.enable_progress_bar=false",
        "eval.fp_ppl=false"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Model dirs, corpora, checkpoints and an export to break, built once."""
    from qat.export.writer import export_model
    from qat.models import ModelSpec, load_model
    from qat.quant import QuantConfig, WeightSpec, prepare

    d = tmp_path_factory.mktemp("inputs")
    model, tok = load_model(ModelSpec(name="tiny"))
    model.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = float("nan")
    model.save_pretrained(d / "nan_model")
    tok.save_pretrained(d / "nan_model")
    other, other_tok = load_model(ModelSpec(name="tiny", vocab_size=400))
    other.save_pretrained(d / "other_vocab")
    other_tok.save_pretrained(d / "other_vocab")
    (d / "truncated_model").mkdir()
    for f in (d / "model").iterdir():
        (d / "truncated_model" / f.name).write_bytes(f.read_bytes())
    weights = d / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    _edited_copy(d / "model", d / "missing_tensor",
                 lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    _edited_copy(d / "model", d / "unknown_tensor",
                 lambda t: t.update({"model.layers.0.mlp.extra_proj.weight": torch.zeros(2, 2)}))
    _bert_without_head(d / "bert", tok)
    (d / "empty.txt").write_text("")
    (d / "short.txt").write_text("one short line.\n\nanother one.\n")
    (d / "corpus.csv").write_text("text\nhello\n")
    (d / "body.jsonl").write_text("".join(json.dumps({"body": f"entry {i}"}) + "\n" for i in range(40)))
    (d / "garbage.ckpt").write_bytes(b"this is not a checkpoint at all")
    train(compose_train(TINY + ["trainer.max_steps=2", "checkpoint.every_n_steps=1"]), run_dir=d / "run")
    good = d / "run" / "checkpoints" / "last.ckpt"
    (d / "truncated.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    prepare(model := load_model(ModelSpec(name="tiny"))[0],
            QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    export_model(model, tok, d / "export")
    return d


def _edited_copy(source, target, edit) -> None:
    """A copy of a model dir whose weights file went through `edit(tensors)`."""
    from safetensors.torch import load_file, save_file

    target.mkdir()
    for f in source.iterdir():
        (target / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(target / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


def _bert_without_head(target, tokenizer) -> None:
    """A BERT encoder saved as an encoder (no LM head): a causal-LM loader would add a random head
    and keep its attention bidirectional."""
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=128, max_position_embeddings=1024)
    BertModel(config).save_pretrained(target)
    tokenizer.save_pretrained(target)


# (override(s) built from the fixture dir, the text the error must contain)
CONFIG_CASES = {
    "bits out of range": (["quant.weight.bits=9"], r"quant\.weight\.bits"),
    "group size not dividing a layer": (["quant.weight.group_size=96"], r"group_size=96 .*layers\.0"),
    "pattern matching nothing": (["quant.include=[nothing.*]"], r"quant\.include pattern 'nothing"),
    "missing model dir": (["model.path=/nonexistent/model"], r"model\.path='/nonexistent/model'"),
    "truncated model weights": (["model.path={d}/truncated_model"], r"model\.path=.*truncated_model"),
    "NaN weights in the model": (["model.path={d}/nan_model"],
                                 r"nan_model.*layers\.1\.mlp\.up_proj\.weight.* NaN"),
    "checkpoint lacking a tensor": (["model.path={d}/missing_tensor"],
                                    r"missing_tensor.*lacks 1 tensor.*layers\.1\.mlp\.down_proj\.weight"),
    "checkpoint with an unknown tensor": (["model.path={d}/unknown_tensor"],
                                          r"unknown_tensor.*holds unknown 1 tensor.*extra_proj"),
    "an encoder, not a causal decoder": (["model.path={d}/bert"], r"bert.*(lacks|not a causal)"),
    "vocab too large for the tiny BPE": (["model.vocab_size=100000"], r"model\.vocab_size=100000"),
    "teacher with another tokenizer": (["distill=kd", "distill.teacher.path={d}/other_vocab"],
                                       r"distill\.teacher .*other_vocab.*vocabulary"),
    "missing data file": (["data.path={d}/nope.txt"], r"data\.path: no such file .*nope\.txt"),
    "data file of unknown format": (["data.path={d}/corpus.csv"], r"data\.path: .*corpus\.csv"),
    "empty dataset": (["data.path={d}/empty.txt"], r"data\.path=.*empty\.txt.*empty"),
    "dataset shorter than one block": (["data.path={d}/short.txt"], r"data\.(path|eval_fraction)"),
    "json without the text column": (["data.path={d}/body.jsonl"], r"data\.text_field='text'"),
    "block longer than the model's context": (["data.block_size=2048"],
                                              r"data\.block_size=2048 exceeds .*max_position_embeddings=1024"),
    "eval fraction outside (0, 1)": (["data.eval_fraction=1.5"], r"data\.eval_fraction"),
    "negative learning rate": (["optim.lr=-1"], r"optim\.lr=-1"),
    "negative max_steps": (["trainer.max_steps=-5"], r"trainer\.max_steps=-5"),
    "mistyped trainer key": (["+trainer.max_step=20"],
                             r"trainer\.max_step is not a known key \(did you mean max_steps.*trainer "
                             r"accepts: .*accumulate_grad_batches"),
    "unknown quant key": (["+quant.weight.bitz=4"],
                          r"quant\.weight\.bitz is not a known key \(did you mean bits.*accepts: "),
    "unknown block-stage key": (["+blockwise.epoch=2"], r"blockwise\.epoch .*did you mean epochs"),
    "unknown data key": (["+data.blocksize=64"], r"data\.blocksize .*did you mean block_size"),
    "unknown top-level key": (["+optimm.lr=1"], r"optimm .*did you mean optim"),
    "unknown stage device": (["model.device=tpu"], r"model\.device='tpu' is not allowed; one of auto"),
    "unknown export dtype": (["export.dtype=int8"], r"export\.dtype='int8'"),
    "unknown export backend": (["export.eval_backend=fast"], r"export\.eval_backend='fast'"),
    "unknown FSDP2 compute dtype": (["trainer=fsdp2", "trainer.accelerator=cpu",
                                     "trainer.strategy.param_dtype=int8"],
                                    r"trainer\.strategy\.param_dtype='int8' is not allowed"),
    "masks recomputed on sharded weights": (["trainer=fsdp2", "trainer.accelerator=cpu",
                                             "prune=magnitude", "prune.schedule=gradual",
                                             "prune.end_step=4"],
                                            r"prune\.schedule='gradual'.*trainer=fsdp2"),
    "rank 0 never waited for": (["launch.stage_wait_minutes=0"], r"launch\.stage_wait_minutes=0"),
    "resume with no checkpoint": (["ckpt_path=last"], r"ckpt_path=last: no checkpoint at .*last\.ckpt"),
    "resume from a garbage file": (["ckpt_path={d}/garbage.ckpt"], r"ckpt_path=.*garbage\.ckpt"),
    "resume from a truncated checkpoint": (["ckpt_path={d}/truncated.ckpt"],
                                           r"ckpt_path=.*truncated\.ckpt: cannot be read"),
    "resume with another quantization": (["ckpt_path={d}/run/checkpoints/last.ckpt",
                                          "quant.weight.bits=3"], r"quant\.weight\.bits=3 differs"),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_bad_input_is_named_and_leaves_no_run_dir(files, tmp_path, case):
    overrides, message = CONFIG_CASES[case]
    run_dir = tmp_path / "run"
    run_dir.mkdir()  # as Hydra creates it before the job starts
    with pytest.raises(ConfigError, match=message):
        train(compose_train(TINY + [o.format(d=files) for o in overrides]), run_dir=run_dir)
    assert not run_dir.exists()


def test_unwritable_output_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")  # a file where a directory must go: unwritable even for root
    with pytest.raises(ConfigError, match=r"run directory .*a_file/run is not writable"):
        train(compose_train(TINY + ["trainer.max_steps=2"]), run_dir=blocker / "run")
    assert blocker.read_text() == "x"


@pytest.mark.parametrize("override,message", [
    ("quant.weight.bitz=4", r"quant\.weight\.bitz"),  # a typo in a key
    ("recipe=nope", r"recipe.*nope|nope.*recipe"),    # a recipe that does not exist
])
def test_bad_override_is_named_by_hydra(override, message):
    with pytest.raises((ConfigCompositionException, MissingConfigException), match=message):
        compose_train(TINY + [override])


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    import qat.lightning.checkpointing as checkpointing

    real, calls = checkpointing.write_checkpoint, []

    def fill_disk(checkpoint, path):
        calls.append(path)
        if len(calls) < 3:  # step 1 and its last.ckpt copy succeed
            return real(checkpoint, path)
        Path(path).write_bytes(b"\0" * 1000)  # a partial write, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing, "write_checkpoint", fill_disk)
    cfg = compose_train(TINY + ["trainer.max_steps=3", "checkpoint.every_n_steps=1"])
    with pytest.raises(OSError, match=r"cannot write .*epoch=0-step=2\.ckpt: No space left"):
        train(cfg, run_dir=tmp_path)
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=1.ckpt", "last.ckpt"]
    for name in ("epoch=0-step=1.ckpt", "last.ckpt"):
        assert torch.load(ckpts / name, weights_only=True)["global_step"] == 1
    assert not (tmp_path / "metrics.json").exists()


def test_file_size_limit_during_a_report_leaves_nothing(tmp_path):
    """A real short write: RLIMIT_FSIZE makes the kernel refuse bytes past 4 KiB (EFBIG)."""
    script = f"""
import resource, signal
from qat.io import write_json
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
try:
    write_json({str(tmp_path / 'metrics.json')!r}, {{"x": "y" * 100000}})
except OSError as err:
    print(err)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True)
    assert "cannot write" in out.stdout and "metrics.json" in out.stdout, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temporary


def test_export_that_reads_back_wrong_is_never_renamed(files, tmp_path, monkeypatch):
    import qat.export.writer as writer
    from qat.models import ModelSpec, load_model
    from qat.quant import QuantConfig, WeightSpec, prepare

    real = writer.save_file

    def flip_a_bit(tensors, path, metadata=None):
        key = next(k for k in tensors if k.endswith("weight_packed"))
        tensors = {**tensors, key: tensors[key] ^ 1}
        return real(tensors, path, metadata=metadata)

    monkeypatch.setattr(writer, "save_file", flip_a_bit)
    model, tok = load_model(ModelSpec(name="tiny"))
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    with pytest.raises(OSError, match=r"model\.safetensors: tensor .*weight_packed.* differs"):
        writer.export_model(model, tok, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def _copy_export(files, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    for f in (files / "export").iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize("damage,error,message", [
    ("truncate_weights", ValueError, r"model\.safetensors: not a readable safetensors file"),
    ("delete_weights", FileNotFoundError, r"model\.safetensors: missing"),
    ("bad_json", ValueError, r"config\.json: not valid JSON"),
    ("no_quantization_config", ValueError, r"config\.json: no quantization_config"),
])
def test_damaged_export_is_refused_naming_the_file(files, tmp_path, damage, error, message):
    from qat.export.load import load_quantized

    out = _copy_export(files, tmp_path)
    weights, config = out / "model.safetensors", out / "config.json"
    if damage == "truncate_weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "delete_weights":
        weights.unlink()
    elif damage == "bad_json":
        config.write_text(config.read_text()[:50])
    else:
        data = json.loads(config.read_text())
        del data["quantization_config"]
        config.write_text(json.dumps(data))
    with pytest.raises(error, match=message):
        load_quantized(out)


def test_export_cli_with_a_missing_checkpoint(tmp_path, capsys):
    from qat.export.__main__ import main

    assert main(["--ckpt", str(tmp_path / "none.ckpt"), "--out", str(tmp_path / "e")]) == 2
    assert "none.ckpt: no such checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_loading_is_safe_by_construction():
    """Weights load through safetensors or torch.load(weights_only=True); no pickle but a
    restricted unpickler (an allowlist of classes: a distributed checkpoint's shard index);
    remote code stays off unless a config turns it on."""
    import re

    sources = list((ROOT / "qat").rglob("*.py")) + [ROOT / "train.py"]
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert not re.search(r"^\s*(import|from) (cpickle|dill)\b", text, re.M), path
        if re.search(r"^\s*(import|from) pickle\b", text, re.M):
            assert "def find_class" in text and not re.search(r"pickle\.(load|loads|Unpickler\()",
                                                              text), path
    for path in (ROOT / "qat" / "conf").rglob("*.yaml"):
        assert "trust_remote_code: true" not in path.read_text(), path
