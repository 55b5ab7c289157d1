"""BlockStore: the block stage's progress on disk, so a killed run resumes at the next block.

    <dir>/init.safetensors       the decoder blocks after quant.init (PTQ), before any training
    <dir>/init_007.safetensors   block 7 after quant.init, in a streamed run (one block at a time)
    <dir>/block_007.safetensors  block 7 after its training (weights, norms, frozen grid)
    <dir>/progress.json          the config they were made with and each trained block's result

Every file is written under a temporary name and renamed when complete, tensors through
safetensors (data, never code). A block counts as done only when its file and its progress entry
are both there, so a kill at any moment loses at most the block in training.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qat.io import atomic_path, first_difference, write_json
from qat.quant.swap import keeps_codes_only

PROGRESS = "progress.json"
INIT = "init.safetensors"


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))


def _load(module: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    state = load_file(str(path))
    device = next(module.parameters()).device
    module.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)


SHAPED_BY = ("model", "data", "quant", "ptq", "blockwise", "prune", "seed")  # run config sections


class BlockStore:
    """Block files and progress under `directory`, tied to the config that made them.

    Args:
        directory: where the files go (train.py: <run dir>/checkpoints/blockwise).
        config: the run's model/quant/ptq/blockwise sections; files written under another config
            are refused, naming the first field that differs.
    """

    def __init__(self, directory: str | Path, config: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.config = json.loads(json.dumps(config))  # plain JSON values, as read back

    @classmethod
    def of_run(cls, run_dir: Path, run_config: dict[str, Any]) -> "BlockStore":
        """The block stage's files of a run, tied to everything that shapes the blocks: also the
        form they are saved in (optim.trainable=scales keeps a trained block's integer codes, not
        its weights), so that a resume under the other form is refused by name."""
        config = {k: run_config.get(k) for k in SHAPED_BY}
        trainable = (run_config.get("optim") or {}).get("trainable")
        config["optim"] = {"trainable": "scales" if keeps_codes_only(trainable)
                           else "weights or all"}
        return cls(Path(run_dir) / "checkpoints" / "blockwise", config)

    def _progress(self) -> dict[str, Any]:
        path = self.directory / PROGRESS
        if not path.is_file():
            return {"config": self.config, "blocks": []}
        progress = json.loads(path.read_text())
        if progress.get("config") != self.config:
            key, was, now = first_difference(progress.get("config"), self.config, "config")
            raise ValueError(f"blockwise: {self.directory} holds blocks trained with {key}="
                             f"{was!r}, this run has {key}={now!r}; resume with the run's own "
                             "config or use a new hydra.run.dir")
        return progress

    def completed(self) -> list[dict[str, Any]]:
        """Results of the blocks already trained and saved, in order (consecutive from 0)."""
        done = []
        for entry in self._progress()["blocks"]:
            if not self.block_path(entry["index"]).is_file() or entry["index"] != len(done):
                break
            done.append(entry)
        return done

    def block_path(self, index: int) -> Path:
        return self.directory / f"block_{index:03d}.safetensors"

    def save(self, index: int, block: nn.Module, result) -> None:
        """The trained block, then its progress entry (the entry makes it count)."""
        _save(block.state_dict(), self.block_path(index))
        progress = self._progress()
        progress["blocks"] = [b for b in progress["blocks"] if b["index"] < index] + [asdict(result)]
        write_json(self.directory / PROGRESS, progress)

    def load(self, index: int, block: nn.Module) -> None:
        _load(block, self.block_path(index))

    def exists(self) -> bool:
        return (self.directory / PROGRESS).is_file()

    def clear(self) -> None:
        """A new (not resumed) run: nothing of an earlier run in the same directory counts."""
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)

    # quant.init's result: resuming must not calibrate again
    def has_init(self) -> bool:
        """Whether quant.init's result is saved: the blocks (one file, or a streamed run's one
        per block) and, written after them, the measurements (`save_init`)."""
        return self.exists() and ((self.directory / INIT).is_file() or (
            self.init_block_path(0).is_file() and self.init_info() is not None))

    def init_block_path(self, index: int) -> Path:
        return self.directory / f"init_{index:03d}.safetensors"

    def save_init_block(self, index: int, block: nn.Module) -> None:
        """One block after quant.init (a streamed run calibrates, and saves, a block at a
        time)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        _save(block.state_dict(), self.init_block_path(index))

    def init_tensors(self, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors of block `index` after a streamed quant.init, by their names in the block."""
        from qat.format.shards import iter_tensors

        wanted = set(names)
        path = self.init_block_path(index)
        found = {k: v for k, v in iter_tensors(path) if k in wanted} if path.is_file() else {}
        if set(found) != wanted:
            raise ValueError(f"blockwise: {self.directory} holds no quant.init result for block "
                             f"{index} ({sorted(wanted - set(found))[:3]})")
        return found

    def save_init(self, blocks: nn.Module | None, info: dict[str, Any]) -> None:
        """The PTQ-initialised blocks (None: no quant.init) and what the run measured of them."""
        if blocks is not None:
            _save(blocks.state_dict(), self.directory / INIT)
        self.update_info(info)

    def update_info(self, info: dict[str, Any]) -> None:
        progress = self._progress()
        progress["info"] = dict(progress.get("info", {}), **info)
        write_json(self.directory / PROGRESS, progress)

    def load_init(self, blocks: nn.Module) -> None:
        _load(blocks, self.directory / INIT)

    def load_init_block(self, index: int, block: nn.Module) -> None:
        """One block of the saved quant.init result (the rest stays on disk)."""
        from safetensors import safe_open

        if self.init_block_path(index).is_file():
            _load(block, self.init_block_path(index))
            return
        start = f"{index}."
        with safe_open(str(self.directory / INIT), framework="pt") as f:
            state = {k[len(start):]: f.get_tensor(k) for k in f.keys() if k.startswith(start)}
        device = next(block.parameters()).device
        block.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True)

    def init_info(self) -> dict[str, Any] | None:
        """What the run measured and noted (ptq_ppl, block_ppl); None before quant.init's save."""
        return self._progress().get("info") if self.exists() else None

    def report(self):
        """The BlockwiseReport of the saved blocks (a run resumed after its block stage)."""
        from qat.blockwise.train import BlockResult, BlockwiseReport

        info = self.init_info() or {}
        blocks = [BlockResult(**b) for b in self.completed()]
        return BlockwiseReport(samples=info.get("samples", 0), tokens=info.get("tokens", 0),
                               seconds=sum(b.seconds for b in blocks),
                               resumed_blocks=len(blocks), blocks=blocks)

