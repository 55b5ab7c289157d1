"""Text corpora as token ids: which corpus (`DataSpec`), its entries (`load_texts`), one tokenization.

One code path for every source: a builtin name becomes a cached jsonl, a user file is read as is,
and both go through `datasets.load_dataset`. Below the trainer and the evaluation: the run, the
eval command and the data config all read text through here.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from qat.assets import cache_dir
from qat.data.corpora import BUILTIN_CORPORA, builtin_jsonl
from qat.io import atomic_path

log = logging.getLogger(__name__)

_FORMATS = {".json": "json", ".jsonl": "json", ".txt": "text"}


@dataclass(frozen=True)
class DataSpec:
    """Which corpus, how it is split, blocked and windowed. `path` wins over `name`."""

    name: str | None = "wiki"  # builtin (wiki | shakespeare | tiny) or a hub dataset id
    path: str | tuple[str, ...] | None = None  # local .txt/.json/.jsonl file(s), one format
    text_field: str = "text"
    eval_fraction: float = 0.05  # last fraction of entries held out
    block_size: int = 256
    batch_size: int = 4
    eval_window: int = 512
    eval_windows: int = 64
    eval_batch_size: int = 4
    num_workers: int = 0
    seed: int = 0
    ood: str | None = None  # second eval set: builtin name or a local file
    ood_fraction: float = 0.05  # protocol: last 5% of Shakespeare's plays = 2 plays
    ood_windows: int = 32
    # > 0: that many eval_window-token windows cut from the end of the training split, never
    # trained or calibrated on: val_ppl, the score settings are chosen on (not the reported windows)
    val_windows: int = 0
    generated_samples: int = 0  # > 0: train on this many teacher-written sequences (data-free)
    generation_temperature: float = 1.0  # sampling temperature of those sequences
    # the share of the training blocks the teacher-written ones make: 1.0 trains on them alone;
    # below 1 they are interleaved evenly with the split's first blocks (mix_blocks)
    generated_share: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.path, str) and not self.path.strip():
            raise ValueError("data.path must be a file path, a non-empty list of them, or null")
        if self.path is not None and not isinstance(self.path, str):
            object.__setattr__(self, "path", tuple(str(p) for p in self.path))  # Hydra ListConfig
            if not self.path:
                raise ValueError("data.path must be a file path, a non-empty list of them, or null")
        if self.path is None and not self.name:
            raise ValueError(f"set data.name (one of {sorted(BUILTIN_CORPORA)} or a hub dataset id) "
                             f"or data.path (a local .txt/.json/.jsonl file)")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"data.text_field must be a non-empty column name, "
                             f"got {self.text_field!r}")
        for field in ("eval_fraction", "ood_fraction"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
                raise ValueError(f"data.{field} must be a number in (0, 1), got {value!r}")
        for field, low in (("block_size", 2), ("batch_size", 1), ("eval_window", 2),
                           ("eval_windows", 1), ("eval_batch_size", 1), ("num_workers", 0),
                           ("ood_windows", 1), ("val_windows", 0), ("generated_samples", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{field} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"data.seed must be an integer, got {self.seed!r}")
        temp = self.generation_temperature
        if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not temp > 0:
            raise ValueError(f"data.generation_temperature must be a number > 0, got {temp!r}")
        share = self.generated_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
            raise ValueError(f"data.generated_share must be a number in (0, 1], got {share!r}")
        if self.ood is not None and (not isinstance(self.ood, str) or not self.ood):
            raise ValueError(f"data.ood must be null, a builtin name {sorted(BUILTIN_CORPORA)} or a "
                             f"local file, got {self.ood!r}")


def load_texts(source: str | tuple[str, ...], text_field: str = "text", field: str = "data.path",
               hub: bool = False) -> list[str]:
    """Entries of a builtin corpus, local file(s) or hub dataset, in order; empty entries dropped.

    Args:
        source: builtin name, file path (or paths), or hub dataset id (with `hub=True`).
        text_field: the column holding the text (json/jsonl and hub datasets).
        field: the config field named in error messages.
        hub: whether a `source` that is neither builtin nor an existing file is a hub id.
    """
    import datasets

    if isinstance(source, str) and source in BUILTIN_CORPORA:
        files, fmt, text_field = [str(builtin_jsonl(source))], "json", "text"
    elif isinstance(source, str) and hub and not _looks_like_file(source):
        ds = datasets.load_dataset(source, split="train")
        return _column(ds, text_field, f"{field}={source!r}")
    else:
        files, fmt = _local_files(source, field)
    if all(Path(f).stat().st_size == 0 for f in files):
        raise ValueError(f"{field}={source!r} has no non-empty entries (empty file)")
    kwargs = {"sample_by": "paragraph"} if fmt == "text" else {}
    try:
        ds = datasets.load_dataset(fmt, data_files=files, split="train", **kwargs)
    except datasets.exceptions.DatasetGenerationError as err:  # malformed json and the like
        raise ValueError(f"{field}={source!r} could not be read as {fmt}: "
                         f"{err.__cause__ or err}") from err
    return _column(ds, "text" if fmt == "text" else text_field, f"{field}={source!r}")


def _looks_like_file(source: str) -> bool:
    return Path(source).suffix.lower() in _FORMATS or Path(source).expanduser().exists()


def _local_files(source: str | tuple[str, ...], field: str) -> tuple[list[str], str]:
    paths = [Path(p).expanduser() for p in ([source] if isinstance(source, str) else source)]
    fmts = set()
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"{field}: no such file {str(p)!r}")
        if p.suffix.lower() not in _FORMATS:
            raise ValueError(f"{field}: {str(p)!r} must end in one of {sorted(_FORMATS)}")
        fmts.add(_FORMATS[p.suffix.lower()])
    if len(fmts) > 1:
        raise ValueError(f"{field}: mix of .txt and .json/.jsonl files; use one format")
    return [str(p) for p in paths], fmts.pop()


def _column(ds, text_field: str, what: str) -> list[str]:
    if text_field not in ds.column_names:
        raise ValueError(f"data.text_field={text_field!r} is not a column of {what}; "
                         f"columns: {ds.column_names}")
    texts = [t for t in ds[text_field] if isinstance(t, str) and t.strip()]
    if not texts:
        raise ValueError(f"{what} has no non-empty {text_field!r} entries")
    return texts


def tokenize(tokenizer, texts: list[str], cache: bool = True) -> torch.Tensor:
    """Join entries with a blank line and tokenize once, without BOS/EOS: (N,) int64.

    A single string cannot be tokenized in parallel (the wiki train split takes ~10 s), so with a fast
    tokenizer the ids are cached under `cache_dir()/tokens/`, keyed by the tokenizer's full
    serialisation and the text itself.
    """
    text = "\n\n".join(texts)
    path = _token_cache_path(tokenizer, text) if cache else None
    if path is not None and path.exists():
        try:
            return torch.load(path, weights_only=True)
        except Exception as err:  # a damaged cache entry is rebuilt, never trusted
            log.warning("ignoring unreadable token cache %s: %s", path, err)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"],
                       dtype=torch.long)
    if path is not None:
        with atomic_path(path) as tmp:
            torch.save(ids, tmp)
    return ids


def _token_cache_path(tokenizer, text: str) -> Path | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or len(text) < 100_000:  # slow tokenizers: no reliable key; short: no need
        return None
    key = hashlib.sha256()
    for part in (type(tokenizer).__name__, backend.to_str(), text):
        key.update(part.encode("utf-8") + b"\0")
    return cache_dir() / "tokens" / f"{key.hexdigest()[:32]}.pt"
