"""The onloaded float model (qat.models.onload): the same numbers as the model loaded whole, with
at most one decoder block's tensors in memory at any time."""
import pytest
import torch
from conftest import compose_train
from transformers import AutoModelForCausalLM, LlamaConfig

import qat.models.onload as onload
import qat.train.streamed as streamed
from qat.distill import Distiller, freeze
from qat.distill.spec import DistillSpec
from qat.models.onload import held, is_onloaded, onloaded_model
from qat.models.structure import decoder_blocks
from qat.train import train


def _saved(directory, tie=True, shard="100KB"):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         tie_word_embeddings=tie)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory, max_shard_size=shard)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def _materialized(model) -> list[int]:
    _, blocks = decoder_blocks(model)
    return [i for i, b in enumerate(blocks)
            if any(p.device.type != "meta" for p in b.parameters())]


def test_onloaded_logits_equal_the_whole_model_bit_for_bit(tmp_path):
    ids = torch.randint(0, 300, (2, 17), generator=torch.Generator().manual_seed(1))
    for tie, shard in ((True, "100KB"), (False, "5GB")):
        _saved(tmp_path / f"{tie}", tie, shard)
        for dtype in (torch.float32, torch.bfloat16):
            model = onloaded_model(tmp_path / f"{tie}", dtype)
            reference = AutoModelForCausalLM.from_pretrained(tmp_path / f"{tie}", dtype=dtype)
            with torch.no_grad():
                assert torch.equal(model(ids).logits, reference(ids).logits), (tie, dtype)
            assert _materialized(model) == []  # every block went back to its files
            assert (model.lm_head.weight is model.model.embed_tokens.weight) == tie


def test_one_block_in_memory_at_a_time(tmp_path):
    _saved(tmp_path)
    model = onloaded_model(tmp_path, torch.float32)
    seen = []
    for block in decoder_blocks(model)[1]:
        block.mlp.register_forward_hook(lambda *_: seen.append(_materialized(model)))
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert seen == [[0], [1], [2]]
    block = decoder_blocks(model)[1][1]
    with held(block):  # a stage calling one block many times reads it once
        assert _materialized(model) == [1]
        with torch.no_grad():
            model(torch.tensor([[1, 2, 3]]))
        assert _materialized(model) == [1]
    assert _materialized(model) == []


def test_files_that_are_not_the_models_own_names_give_none(tmp_path):
    from safetensors.torch import load_file, save_file

    _saved(tmp_path, shard="5GB")
    tensors = load_file(tmp_path / "model.safetensors")
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert onloaded_model(tmp_path, torch.float32) is None


def test_distillation_losses_equal_those_of_a_copied_teacher(tmp_path):
    whole = _saved(tmp_path)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(2))
    spec = DistillSpec(hidden_weight=0.5, ce_weight=0.1)
    copied = Distiller(spec, freeze(AutoModelForCausalLM.from_pretrained(tmp_path)))(whole, ids)
    onloaded = Distiller(spec, onloaded_model(tmp_path, torch.float32))(whole, ids)
    for key in copied:
        assert torch.equal(copied[key], onloaded[key]), key


def _run(tmp_path, name, recipe):
    from qat.models import ModelSpec, load_model

    source = tmp_path / "model"
    if not source.exists():
        model, tokenizer = load_model(ModelSpec(name="tiny"))
        model.save_pretrained(source)
        tokenizer.save_pretrained(source)
    cfg = compose_train([f"recipe={recipe}", f"model.path={source}", "data=tiny", "logger=none",
                         "trainer.enable_progress_bar=false", "trainer.max_steps=2",
                         "blockwise.samples=4", "blockwise.epochs=1", "blockwise.seq_len=64",
                         "export.enabled=false"])
    return train(cfg, run_dir=tmp_path / name)


def test_a_run_gives_what_it_gave_with_a_copied_float_model(tmp_path, monkeypatch):
    """The KD teacher and the block stage's targets read from the files give exactly the
    numbers of the deep copies they replace (float32, CPU)."""
    built = []
    original = onload.onloaded_model
    monkeypatch.setattr(onload, "onloaded_model",
                        lambda *a, **k: built.append(original(*a, **k)) or built[-1])
    onloaded = _run(tmp_path, "onloaded", "w4g64_kd")
    assert built and all(m is not None and is_onloaded(m) for m in built)
    monkeypatch.setattr(onload, "onloaded_model", lambda *a, **k: None)  # the copies of before
    monkeypatch.setattr(streamed, "streamed_dir", lambda *a: None)  # and the whole student
    copied = _run(tmp_path, "copied", "w4g64_kd")
    for key in ("fp_ppl", "ptq_ppl", "block_ppl", "ppl", "first_loss", "last_loss"):
        assert onloaded.get(key) == copied.get(key), key
    for key in ("mean_loss_before", "mean_loss_after"):
        assert onloaded["blockwise"][key] == copied["blockwise"][key], key


def test_blocks_read_without_gradients_reuse_one_set_of_tensors(tmp_path):
    """Block after block is copied into the tensors of the block dropped before it: a pass over
    the model allocates one block, so the C heap neither grows nor fragments."""
    reference = _saved(tmp_path)
    model = onloaded_model(tmp_path, torch.float32)
    seen = []
    for block in decoder_blocks(model)[1]:
        block.mlp.register_forward_hook(
            lambda m, *_: seen.append(m.up_proj.weight.untyped_storage().data_ptr()))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        first = model(ids).logits
        second = model(ids).logits
        assert torch.equal(first, second) and torch.equal(first, reference(ids).logits)
    assert len(seen) == 6 and len(set(seen[:3])) == 1 and len(set(seen[3:])) == 1  # per pass
    seen.clear()
    model(ids)  # with gradients enabled a read is never reused: a graph may hold it
    assert len(seen) == 3


def test_perplexity_of_an_onloaded_model_reads_each_block_once(tmp_path, monkeypatch):
    from qat.eval.perplexity import perplexity

    reference = _saved(tmp_path)
    model = onloaded_model(tmp_path, torch.float32)
    ids = torch.randint(0, 300, (200,), generator=torch.Generator().manual_seed(4))
    loads = []
    loader = onload.onloader_of(model)
    original = loader.load
    monkeypatch.setattr(loader, "load", lambda block, *a: loads.append(block) or original(block, *a))
    got = perplexity(model, ids, window=16, max_windows=None, batch_size=3)
    want = perplexity(reference, ids, window=16, max_windows=None, batch_size=3)
    assert got.ppl == want.ppl and got.nll_sum == want.nll_sum and got.n_windows == 12
    assert len(loads) == 3  # 4 batches, 3 blocks: each block read once


def test_tensor_files_read_what_safetensors_wrote_into_the_buffers_given(tmp_path):
    """Plain reads (no memory map) give safetensors' own tensors, cast as asked; a buffer of the
    stored dtype is filled in place, one of another dtype gets the cast copy; integers keep their
    dtype; a dtype plain reads do not know (fp8) still reads, through safetensors."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(6, 4, generator=g), "b": torch.randn(5, generator=g).bfloat16(),
               "i": torch.randint(-9, 9, (3,), generator=g, dtype=torch.int64),
               "f8": torch.randn(4, generator=g).to(torch.float8_e4m3fn)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    files = onload.TensorFiles(tmp_path)
    assert files.shapes() == {k: tuple(v.shape) for k, v in tensors.items()}
    expected = load_file(str(tmp_path / "model.safetensors"))
    into = {"w": torch.empty(6, 4), "b": torch.empty(5)}
    pointers = {k: v.data_ptr() for k, v in into.items()}
    read = files.read(list(tensors), torch.float32, "cpu", into=into)
    for key, value in expected.items():
        want = value.float() if value.is_floating_point() else value
        assert read[key].dtype == want.dtype and torch.equal(read[key], want), key
    assert {k: read[k].data_ptr() for k in into} == pointers  # filled where they were
    assert read["i"].dtype == torch.int64
    assert files.read(["b"], None, "cpu")["b"].dtype == torch.bfloat16  # None: as stored
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:-60])
    with pytest.raises(ValueError, match="truncated|unreadable"):
        onload.TensorFiles(tmp_path).read(["f8", "i", "w", "b"], torch.float32, "cpu")
    with pytest.raises(ValueError, match="truncated"):
        onload.TensorFiles(tmp_path).read(["i", "w", "b"], torch.float32, "cpu")
