"""What the export stage checks after writing: the files read back hold what was measured."""
from __future__ import annotations

from pathlib import Path
import torch


def check_same_tensors(served: torch.nn.Module, reread: torch.nn.Module, out_dir: Path) -> None:
    """The export read back stores what the in-memory served model stores, bit for bit (the file
    already equals the latter: the writer's verify_export). Compared in the stored layout, so a
    float Linear made from a Conv1D matches the Conv1D the loader rebuilds."""
    from qat.export.compressed_tensors import stored_tensors

    mine, theirs = (stored_tensors(m, torch.float32)[0] for m in (served, reread))
    if mine.keys() != theirs.keys():
        raise OSError(f"{out_dir}: the export read back has other tensors than the converted model "
                      f"({sorted(mine.keys() ^ theirs.keys())[:3]})")
    for key, value in mine.items():
        if value.dtype != theirs[key].dtype or not torch.equal(value, theirs[key]):
            raise OSError(f"{out_dir}: tensor {key!r} read back differs from the converted model")
