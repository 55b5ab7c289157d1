"""Text corpora as fixed-length token blocks for training and protocol windows for evaluation.

One code path for every source: a builtin name becomes a cached jsonl, a user file is read as is,
and both go through `datasets.load_dataset`. The held-out split is the last `eval_fraction` of
ENTRIES (not tokens) in file order, joined with "\\n\\n" and tokenized once without special
tokens, exactly as eval-protocol.md prescribes for the reference numbers.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qat.assets import cache_dir
from qat.data.corpora import BUILTIN_CORPORA, builtin_jsonl
from qat.eval.perplexity import eval_windows
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
    generated_samples: int = 0  # > 0: train on this many teacher-written sequences (data-free)
    generation_temperature: float = 1.0  # sampling temperature of those sequences

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
                           ("ood_windows", 1), ("generated_samples", 0)):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{field} must be an integer >= {low}, got {value!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"data.seed must be an integer, got {self.seed!r}")
        temp = self.generation_temperature
        if not isinstance(temp, (int, float)) or isinstance(temp, bool) or not temp > 0:
            raise ValueError(f"data.generation_temperature must be a number > 0, got {temp!r}")
        if self.ood is not None and (not isinstance(self.ood, str) or not self.ood):
            raise ValueError(f"data.ood must be null, a builtin name {sorted(BUILTIN_CORPORA)} or a "
                             f"local file, got {self.ood!r}")


def split_entries(texts: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, eval): the eval split is the last n - int(n * (1 - eval_fraction)) entries, in order.

    For the 10,033 wiki summaries at 0.05 that is 502 entries, as the protocol requires.
    """
    n_train = int(len(texts) * (1.0 - eval_fraction))
    return texts[:n_train], texts[n_train:]


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


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, T)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i]}


class TextDataModule(L.LightningDataModule):
    """Train blocks and protocol eval windows of one corpus (plus an optional out-of-domain set).

    After `setup()`: `train_blocks` (N, block_size), `eval_ids` (M,), `eval_blocks`
    (eval_windows, eval_window), and `ood_ids` / `ood_blocks` when `spec.ood` is set (else None).
    `val_dataloader()` yields only the in-domain windows; `ood_dataloader()` the out-of-domain ones.

    Args:
        spec: the data settings.
        tokenizer: the model's tokenizer.
        max_positions: the model's context length; longer blocks or windows are refused up front.
    """

    def __init__(self, spec: DataSpec, tokenizer, max_positions: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.tokenizer = tokenizer
        self.max_positions = max_positions
        self.train_blocks: torch.Tensor | None = None
        self.eval_ids: torch.Tensor | None = None
        self.eval_blocks: torch.Tensor | None = None
        self.ood_ids: torch.Tensor | None = None
        self.ood_blocks: torch.Tensor | None = None
        self.n_train_entries = self.n_eval_entries = 0
        self._train_loader: ResumableLoader | None = None
        self._resume_state: dict[str, int] | None = None  # data position from a checkpoint
        for field in ("block_size", "eval_window"):
            size = getattr(spec, field)
            if max_positions is not None and size > max_positions:
                raise ValueError(f"data.{field}={size} exceeds the model's "
                                 f"max_position_embeddings={max_positions}")

    def prepare_data(self) -> None:
        # builtins are written to the cache once, in one process
        for source in (self._source(), self.spec.ood):
            if isinstance(source, str) and source in BUILTIN_CORPORA:
                builtin_jsonl(source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is not None:
            return
        s = self.spec
        where = "data.path" if s.path is not None else "data.name"
        texts = load_texts(self._source(), s.text_field, where, hub=s.path is None)
        train, held_out = split_entries(texts, s.eval_fraction)
        if not train or not held_out:
            raise ValueError(f"{where}: {len(texts)} entries cannot be split by "
                             f"data.eval_fraction={s.eval_fraction} into non-empty train and eval")
        self.n_train_entries, self.n_eval_entries = len(train), len(held_out)
        train_ids = tokenize(self.tokenizer, train)
        n_blocks = train_ids.numel() // s.block_size
        if n_blocks == 0:
            raise ValueError(f"{where}: the train split has {train_ids.numel()} tokens, fewer than "
                             f"one block of data.block_size={s.block_size}")
        self.train_blocks = train_ids[: n_blocks * s.block_size].view(n_blocks, s.block_size)
        self.eval_ids = tokenize(self.tokenizer, held_out)
        self.eval_blocks = self._windows(self.eval_ids, s.eval_windows, where)
        if s.ood is not None:
            _, ood_texts = split_entries(load_texts(s.ood, s.text_field, "data.ood"), s.ood_fraction)
            self.ood_ids = tokenize(self.tokenizer, ood_texts)
            self.ood_blocks = self._windows(self.ood_ids, s.ood_windows, "data.ood")
        log.info("data: %d train blocks of %d; eval %d tokens -> %d windows of %d",
                 n_blocks, s.block_size, self.eval_ids.numel(), self.eval_blocks.shape[0],
                 s.eval_window)

    def _source(self) -> str | tuple[str, ...]:
        return self.spec.path if self.spec.path is not None else self.spec.name

    def _windows(self, ids: torch.Tensor, max_windows: int, where: str) -> torch.Tensor:
        if ids.numel() < self.spec.eval_window:
            raise ValueError(f"{where}: the eval split has {ids.numel()} tokens, fewer than one "
                             f"window of data.eval_window={self.spec.eval_window}")
        return eval_windows(ids, self.spec.eval_window, max_windows)

    def train_dataloader(self) -> "ResumableLoader":
        """This rank's share of each global batch of one seeded shuffle, resumable mid-epoch.

        Under DDP/FSDP `data.batch_size` is per device and rank r takes rows [r*B, (r+1)*B) of
        every global batch of B * world_size rows, so N processes see exactly the batches one
        process with N times the batch size would (Lightning's DistributedSampler is off).
        """
        trainer = getattr(self, "trainer", None)
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = GlobalBatchSampler(self.train_blocks.shape[0], self.spec.batch_size,
                                     self.spec.seed, rank=rank, world_size=world)
        # its own generator: creating the iterator then draws nothing from the global RNG
        self._train_loader = ResumableLoader(_Blocks(self.train_blocks), batch_sampler=sampler,
                                             num_workers=self.spec.num_workers,
                                             generator=torch.Generator())
        if self._resume_state:
            self._train_loader.load_state_dict(self._resume_state)
            self._resume_state = None
        return self._train_loader

    def state_dict(self) -> dict[str, int]:
        """The data position, also in checkpoints written after fit (Lightning then no longer
        holds the loader, whose own state covers the periodic ones)."""
        return self._train_loader.state_dict() if self._train_loader is not None else {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume_state = dict(state) or None

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.eval_blocks)

    def ood_dataloader(self) -> DataLoader:
        """Out-of-domain windows; raises ValueError when `data.ood` is not set."""
        if self.ood_blocks is None:
            raise ValueError("data.ood is null: there is no out-of-domain eval set")
        return self._eval_loader(self.ood_blocks)

    def _eval_loader(self, blocks: torch.Tensor) -> DataLoader:
        return DataLoader(_Blocks(blocks), batch_size=self.spec.eval_batch_size, shuffle=False,
                          num_workers=self.spec.num_workers)


class GlobalBatchSampler(Sampler[list[int]]):
    """Batches of block indices: rank `rank`'s rows of each global batch of one seeded shuffle.

    Epoch e's order is the permutation torch's RandomSampler drew with a generator seeded once
    (so single-process runs keep the order they always had); it depends only on (seed, epoch), so
    it is the same on every rank and after a resume. One process keeps the last partial batch;
    several drop the last partial global batch (every rank must see the same number of batches).

    Args:
        n: number of training blocks.
        batch_size: rows per batch on this rank.
        seed: the shuffle seed (data.seed).
        rank, world_size: this process and how many share each global batch.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip: tuple[int, int] | None = None  # (epoch, batches) already consumed, on resume

    def __len__(self) -> int:
        rows = self.batch_size * self.world_size
        return -(-self.n // rows) if self.world_size == 1 else self.n // rows

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this before every epoch
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):  # RandomSampler + DataLoader draw this per epoch
            torch.empty((), dtype=torch.int64).random_(generator=generator)
            order = torch.randperm(self.n, generator=generator)
            torch.randperm(self.n, generator=generator)
        return order.tolist()

    def __iter__(self):
        start = 0
        if self.skip is not None and self.skip[0] == self.epoch:
            start = self.skip[1]
        self.skip = None
        order, rows = self.permutation(self.epoch), self.batch_size * self.world_size
        for b in range(start, len(self)):
            first = b * rows + self.rank * self.batch_size
            yield order[first: first + self.batch_size]


class ResumableLoader(DataLoader):
    """A DataLoader whose state is (epoch, batches delivered): Lightning saves it in every
    checkpoint (`state_dict`/`load_state_dict`) and a resumed run continues with the next batch.

    Batches are counted as they are handed out, not as the sampler is read (workers read ahead);
    Lightning does not prefetch from loaders that have a length.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.delivered = 0

    def __iter__(self):
        sampler = self.batch_sampler
        self.delivered = sampler.skip[1] if sampler.skip and sampler.skip[0] == sampler.epoch else 0
        for batch in super().__iter__():
            self.delivered += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        sampler = self.batch_sampler
        return {"epoch": sampler.epoch, "batches": self.delivered,
                "global_batch": sampler.batch_size * sampler.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler = self.batch_sampler
        rows = sampler.batch_size * sampler.world_size
        if state["global_batch"] != rows:
            raise ValueError(f"ckpt_path: the checkpoint was trained with global batches of "
                             f"{state['global_batch']} rows, this run has {rows} (data.batch_size "
                             f"x devices): the data position cannot be carried over")
        sampler.skip = (state["epoch"], state["batches"])
        sampler.epoch, self.delivered = state["epoch"], state["batches"]  # until iteration moves on
