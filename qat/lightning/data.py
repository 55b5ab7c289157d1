"""The Lightning side of the data: a run's tokens (qat.data.tokens) as batches of training blocks,
in a resumable order, and protocol windows for evaluation.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from qat.data.corpora import BUILTIN_CORPORA, builtin_jsonl
from qat.data.text import DataSpec
from qat.data.tokens import Tokens, check_positions, load_tokens


class _Blocks(Dataset):
    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks  # (N, T)

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "row": i}  # row: where a teacher cache keeps it


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
        self.val_blocks: torch.Tensor | None = None  # data.val_windows > 0: never trained on
        self.n_train_entries = self.n_eval_entries = 0
        self._train_loader: ResumableLoader | None = None
        self._resume_state: dict[str, int] | None = None  # data position from a checkpoint
        check_positions(spec, max_positions)

    @classmethod
    def from_tokens(cls, spec: DataSpec, tokens: Tokens) -> "TextDataModule":
        """Around tokens a run already loaded (qat.data.tokens.load_tokens)."""
        data = cls(spec, tokenizer=None)
        data.use(tokens)
        return data

    def use(self, tokens: Tokens) -> None:
        for name in ("train_blocks", "eval_ids", "eval_blocks", "ood_ids", "ood_blocks",
                     "val_blocks", "n_train_entries", "n_eval_entries"):
            setattr(self, name, getattr(tokens, name))

    def prepare_data(self) -> None:
        # builtins are written to the cache once, in one process
        for source in (self.spec.path or self.spec.name, self.spec.ood):
            if isinstance(source, str) and source in BUILTIN_CORPORA:
                builtin_jsonl(source)

    def setup(self, stage: str | None = None) -> None:
        if self.train_blocks is None:
            self.use(load_tokens(self.spec, self.tokenizer))

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

    def visited(self, batches: int) -> list[int]:
        """The rows the first `batches` batches hand this rank (over as many epochs as that
        takes), sorted: what a run of that many batches will read."""
        rows: set[int] = set()
        epoch = 0
        while batches > 0 and len(rows) < self.n and len(self):
            saved = self.epoch, self.skip
            self.epoch, self.skip = epoch, None
            for batch in self:
                rows.update(batch)
                batches -= 1
                if batches == 0:
                    break
            self.epoch, self.skip = saved
            epoch += 1
        return sorted(rows)

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
