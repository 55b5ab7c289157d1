"""The teacher's top-k next-token log-probabilities over the training blocks, computed once.

With `distill.cache_top_k=k` the end-to-end stage never runs the teacher: before it, the teacher
reads every training block once (on the stage device, onloaded block by block as always) and
keeps, per position, its k most likely tokens and their log-probabilities at the KD temperature,
written to `<run dir>/teacher_cache/` (float32 values and int32 ids: 8k bytes per token, memory
mapped; float16 values would shift the loss of a well-trained student by more than its size).
Each step looks up its rows; the loss is `topk_kl`. A resumed run reuses a cache made for the same
blocks, k, temperature and teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import nn

from qat.io import write_json

VALUES, IDS, ROWS, META = "logp.npy", "ids.npy", "rows.npy", "meta.json"


def head_of(model: nn.Module):
    """The model's logits from its decoder's last hidden states (with Gemma's soft-capping)."""
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return (lambda h: torch.tanh(head(h) / cap) * cap) if cap else head


@torch.no_grad()
def topk_logprobs(model: nn.Module, ids: torch.Tensor, k: int, temperature: float,
                  chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids -> the model's top-k log-probabilities at `temperature` (B, T, k) float32 and
    their token ids (B, T, k) int64, the vocabulary-wide logits made `chunk_size` tokens at a
    time."""
    hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state
    flat = hidden.reshape(-1, hidden.shape[-1])
    head = head_of(model)
    values, indices = [], []
    for part in flat.split(chunk_size):
        logp = torch.log_softmax(head(part).float() / temperature, dim=-1)
        v, i = logp.topk(k, dim=-1)
        values.append(v), indices.append(i)
    shape = (*ids.shape, k)
    return torch.cat(values).reshape(shape), torch.cat(indices).reshape(shape)


def cache_key(blocks: torch.Tensor, rows: np.ndarray, k: int, temperature: float,
              teacher: str) -> dict:
    digest = hashlib.sha256(blocks.cpu().contiguous().numpy().tobytes())
    digest.update(rows.tobytes())
    return {"blocks": digest.hexdigest()[:32], "shape": [len(rows), blocks.shape[1]], "k": k,
            "temperature": temperature, "teacher": teacher}


class TeacherCache:
    """A finished cache directory, memory mapped: `rows(r)` gives the cached (B, T, k) values
    (float32) and ids (int64) of training blocks `r` (which must be among those cached)."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / META).read_text())
        self.values = np.load(self.directory / VALUES, mmap_mode="r")
        self.ids = np.load(self.directory / IDS, mmap_mode="r")
        self.kept = np.load(self.directory / ROWS)  # sorted training-block rows held
        n, t = self.meta["shape"]
        if self.values.shape != (n, t, self.meta["k"]) or self.ids.shape != self.values.shape:
            raise ValueError(f"{self.directory}: the cache's arrays {self.values.shape} / "
                             f"{self.ids.shape} do not match its meta.json")

    @property
    def bytes(self) -> int:
        return self.values.nbytes + self.ids.nbytes

    def rows(self, rows: torch.Tensor, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor, torch.Tensor]:
        wanted = rows.cpu().numpy().astype(np.int64)
        at = np.searchsorted(self.kept, wanted).clip(max=len(self.kept) - 1)
        if not np.array_equal(self.kept[at], wanted):
            missing = sorted(set(wanted.tolist()) - set(self.kept.tolist()))
            raise ValueError(f"{self.directory}: training block(s) {missing[:8]} are not in the "
                             f"teacher cache (it holds the {len(self.kept)} the run was "
                             "expected to read)")
        order = np.argsort(at, kind="stable")  # ascending reads from the map, then batch order
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        values = torch.from_numpy(np.ascontiguousarray(self.values[at[order]][back]))
        ids = torch.from_numpy(np.ascontiguousarray(self.ids[at[order]][back]))
        return (values.to(device=device, dtype=torch.float32),
                ids.to(device=device, dtype=torch.int64))


def build_cache(teacher: nn.Module, blocks: torch.Tensor, k: int, temperature: float,
                directory: str | Path, *, teacher_id: str, rows: list[int] | None = None,
                batch_size: int = 4, chunk_size: int = 1024, progress: bool = False
                ) -> TeacherCache:
    """The cache of `teacher` over the (N, T) training `blocks` (only `rows` of them: those the
    run will read), written under a temporary name and renamed when complete; an existing one
    with the same key is reused."""
    from tqdm.auto import tqdm

    directory = Path(directory)
    kept = np.unique(np.asarray(rows if rows is not None else range(blocks.shape[0]),
                                dtype=np.int64))
    key = cache_key(blocks, kept, k, temperature, teacher_id)
    if (directory / META).is_file():
        try:
            if json.loads((directory / META).read_text()) == key:
                return TeacherCache(directory)
        except (ValueError, OSError):
            pass
    vocab = teacher.get_output_embeddings().weight.shape[0]
    if k > vocab:
        raise ValueError(f"distill.cache_top_k={k} exceeds the teacher's vocabulary ({vocab})")
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    n, t = len(kept), blocks.shape[1]
    np.save(tmp / ROWS, kept)
    values = np.lib.format.open_memmap(tmp / VALUES, mode="w+", dtype=np.float32, shape=(n, t, k))
    ids = np.lib.format.open_memmap(tmp / IDS, mode="w+", dtype=np.int32, shape=(n, t, k))
    device = teacher.get_input_embeddings().weight.device
    teacher.eval()
    for start in tqdm(range(0, n, batch_size), desc="teacher cache", disable=not progress):
        batch = blocks[torch.from_numpy(kept[start:start + batch_size])].to(device)
        v, i = topk_logprobs(teacher, batch, k, temperature, chunk_size)
        values[start:start + batch.shape[0]] = v.cpu().numpy()
        ids[start:start + batch.shape[0]] = i.to(torch.int32).cpu().numpy()
    values.flush(), ids.flush()
    del values, ids
    write_json(tmp / META, key)
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return TeacherCache(directory)
