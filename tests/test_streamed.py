"""A streamed run (qat.train.streamed): the student's blocks read from the files one at a time and
held as codes give the numbers, codes, scales and export of the run that loads the model whole."""
import json

import pytest
import torch
from conftest import compose_train

import qat.train.streamed as streamed
from qat.models.structure import decoder_blocks
from qat.quant import fake_quant_modules
from qat.train import train

RUN = ["data=tiny", "logger=none", "trainer.enable_progress_bar=false", "trainer.max_steps=2",
       "blockwise.samples=4", "blockwise.epochs=1", "blockwise.seq_len=64",
       "blockwise.progress=false"]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from qat.models import ModelSpec, load_model

    directory = tmp_path_factory.mktemp("model")
    model, tokenizer = load_model(ModelSpec(name="tiny", num_layers=3))
    model.save_pretrained(directory, max_shard_size="300KB")  # several shards
    tokenizer.save_pretrained(directory)
    return directory


def _run(source, run_dir, overrides):
    cfg = compose_train([f"model.path={source}", *RUN, *overrides])
    return train(cfg, run_dir=run_dir)


def _tensors(run_dir):
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu",
                       weights_only=True)["state_dict"]
    return state


@pytest.mark.parametrize("overrides", [["recipe=w4g64_kd"], ["recipe=w4g64_kd", "quant.init=null"],
                                       ["recipe=w4g64_kd", "model.dtype=bfloat16"],
                                       ["recipe=w4g64_kd", "quant.init=gptq"],
                                       ["recipe=w3g64_kd"]])  # awq
def test_a_streamed_run_equals_the_whole_model_run(source, tmp_path, monkeypatch, overrides):
    seen = {}
    original = streamed.init_blocks

    def observe(model, *args):
        out = original(model, *args)
        seen["held"] = all(m.holds_codes for m in fake_quant_modules(model))
        seen["meta"] = [n for n, p in model.named_parameters() if p.device.type == "meta"]
        return out

    monkeypatch.setattr(streamed, "init_blocks", observe)
    a = _run(source, tmp_path / "streamed", overrides)
    assert seen == {"held": True, "meta": []}  # every block adopted and held as codes
    monkeypatch.setattr(streamed, "streamed_dir", lambda *a: None)  # load the model whole
    b = _run(source, tmp_path / "whole", overrides)
    for key in ("fp_ppl", "ptq_ppl", "block_ppl", "ppl", "first_loss", "last_loss",
                "export_ppl"):
        assert a.get(key) == b.get(key), key
    ta, tb = _tensors(tmp_path / "streamed"), _tensors(tmp_path / "whole")
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert torch.equal(ta[key], tb[key]), key
    export_a = (tmp_path / "streamed" / "export")
    export_b = (tmp_path / "whole" / "export")
    for path in export_a.glob("*.safetensors"):
        assert path.read_bytes() == (export_b / path.name).read_bytes(), path.name
    assert json.loads((tmp_path / "streamed" / "blockwise_report.json").read_text())["blocks"][0][
        "loss_after"] == json.loads((tmp_path / "whole" / "blockwise_report.json").read_text())[
        "blocks"][0]["loss_after"]


@pytest.mark.parametrize("recipe", ["gptq_w4g64", "awq_w4g64"])
def test_a_streamed_ptq_only_run_equals_the_whole_model_run(source, tmp_path, monkeypatch, recipe):
    """PTQ alone (trainer.max_steps=0): calibrated a block at a time, held as codes, nothing
    saved for a block stage; the perplexities and the export of the run that loads it whole."""
    args = [f"model.path={source}", *[o for o in RUN if not o.startswith(("blockwise", "trainer"))],
            f"recipe={recipe}", "trainer.max_steps=0"]
    called = []
    original = streamed.init_blocks
    monkeypatch.setattr(streamed, "init_blocks", lambda *a: called.append(1) or original(*a))
    a = train(compose_train(args), run_dir=tmp_path / "streamed")
    assert called and not (tmp_path / "streamed" / "checkpoints" / "blockwise").exists()
    monkeypatch.setattr(streamed, "streamed_dir", lambda *a: None)
    b = train(compose_train(args), run_dir=tmp_path / "whole")
    for key in ("fp_ppl", "ppl", "export_ppl"):
        assert a[key] == b[key], key
    for path in (tmp_path / "streamed" / "export").glob("*.safetensors"):
        assert path.read_bytes() == (tmp_path / "whole" / "export" / path.name).read_bytes()


def test_a_streamed_block_store_holds_codes_and_resumes(source, tmp_path):
    run_dir = tmp_path / "run"
    first = _run(source, run_dir, ["recipe=w4g64_kd"])
    store = run_dir / "checkpoints" / "blockwise"
    from safetensors import safe_open

    with safe_open(str(store / "block_000.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("weight_fake_quant.codes") for k in keys)
    assert not any(k.endswith("proj.weight") for k in keys)  # codes, never float weights
    # killed after the block stage: resume from the block files, same result
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    again = _run(source, run_dir, ["recipe=w4g64_kd", "ckpt_path=last"])
    assert again["ppl"] == first["ppl"]


def test_a_streamed_calibrated_init_is_saved_a_block_at_a_time_and_resumes(source, tmp_path,
                                                                         monkeypatch):
    """gptq streamed: each calibrated block is saved (its float weights are where the block stage
    starts); a run killed in its block stage resumes at the next block without calibrating
    again, and ends where the uninterrupted run ends."""
    run_dir = tmp_path / "run"
    args = ["recipe=w4g64_kd", "quant.init=gptq"]
    first = _run(source, run_dir, args)
    store = run_dir / "checkpoints" / "blockwise"
    assert sorted(p.name for p in store.glob("init_*")) == [f"init_{i:03d}.safetensors"
                                                           for i in range(3)]
    assert not (store / "init.safetensors").exists()
    (run_dir / "checkpoints" / "last.ckpt").unlink()
    for index in (1, 2):  # killed while training block 1
        (store / f"block_{index:03d}.safetensors").unlink()

    def calibrate(*_):
        raise AssertionError("calibrated again")

    monkeypatch.setattr(streamed, "_calibrate_blocks", calibrate)
    again = _run(source, run_dir, args + ["ckpt_path=last"])
    for key in ("ptq_ppl", "block_ppl", "ppl", "export_ppl"):
        assert again[key] == first[key], key


def test_a_streamed_run_resumes_from_its_checkpoint_streamed(source, tmp_path, monkeypatch):
    """ckpt_path: the resumed run streams too (no whole float model) and ends where the run that
    was never stopped ends, bit for bit."""
    args = ["recipe=w4g64_kd", "trainer.max_steps=4", "checkpoint.every_n_steps=2"]
    straight = _run(source, tmp_path / "straight", args)
    loaded = []
    original = streamed.load_student
    monkeypatch.setattr(streamed, "load_student",
                        lambda *a: loaded.append(a) or original(*a))
    step2 = tmp_path / "straight" / "checkpoints" / "epoch=0-step=2.ckpt"
    resumed = _run(source, tmp_path / "resumed", args + [f"ckpt_path='{step2}'"])
    assert loaded and resumed["steps"] == 4 and resumed["resumed_from"] == str(step2)
    for key in ("ppl", "last_loss", "export_ppl"):
        assert resumed[key] == straight[key], key
    a, b = _tensors(tmp_path / "straight"), _tensors(tmp_path / "resumed")
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_runs_that_need_the_whole_model_load_it(source, tmp_path):
    from qat.train.specs import build_specs

    for overrides, streams in ((["recipe=w4g64_kd"], True), (["recipe=w4g64"], False),
                               (["recipe=w4g64_kd", "quant.init=gptq"], True),
                               (["recipe=w3g64_kd"], True),  # awq
                               (["recipe=gptq_w4g64", "trainer.max_steps=0"], True),  # ptq only
                               (["recipe=gptq_w4g64"], False),  # weights train end to end
                               (["recipe=w4g64_kd", "quant.init=gptq", "ptq.outliers=protect"],
                                False),
                               (["recipe=w4g64_kd", "optim.trainable=weights"], False)):
        cfg = compose_train([f"model.path={source}", "data=tiny", *overrides])
        assert (streamed.streamed_dir(build_specs(cfg), cfg.trainer.max_steps) is not None) \
            == streams, overrides


def test_one_float_block_at_a_time(source, tmp_path, monkeypatch):
    """While the streamed run works, no more than one block holds float weights."""
    import qat.train.run as run

    most = []
    original = run.train_blocks

    def watch(model, *args, **kwargs):
        def count(*_):
            _, blocks = decoder_blocks(model)
            most.append(sum(any(m.weight is not None for m in fake_quant_modules(b))
                            for b in blocks))
        for layer in fake_quant_modules(model):
            layer.register_forward_pre_hook(count)
        return original(model, *args, **kwargs)

    monkeypatch.setattr(run, "train_blocks", watch)
    _run(source, tmp_path / "run", ["recipe=w4g64_kd"])
    assert most and max(most) == 1
