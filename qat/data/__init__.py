"""Text for training and evaluation: builtin corpora from pinned packages (corpora), which corpus a
run reads and its tokenization (text), and the evaluation protocol's split and windows (protocol)."""

from qat.data.corpora import (
    BUILTIN_CORPORA,
    builtin_jsonl,
    shakespeare_texts,
    tiny_texts,
    wiki_summaries_entries,
    write_jsonl,
)
from qat.data.protocol import EvalSet, eval_windows, held_out_ids, protocol_sets, split_entries
from qat.data.text import DataSpec, load_texts, tokenize

__all__ = ["BUILTIN_CORPORA", "builtin_jsonl", "shakespeare_texts", "tiny_texts",
           "wiki_summaries_entries", "write_jsonl", "EvalSet", "eval_windows", "held_out_ids",
           "protocol_sets", "split_entries", "DataSpec", "load_texts", "tokenize"]
