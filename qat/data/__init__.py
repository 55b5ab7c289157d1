"""Corpora: builtin text collections from pinned packages, as ordered lists or cached jsonl files."""

from qat.data.corpora import (
    BUILTIN_CORPORA,
    builtin_jsonl,
    shakespeare_texts,
    tiny_texts,
    wiki_summaries_entries,
    write_jsonl,
)

__all__ = ["BUILTIN_CORPORA", "builtin_jsonl", "shakespeare_texts", "tiny_texts",
           "wiki_summaries_entries", "write_jsonl"]
