"""What the export stage checks after writing: the files read back hold what was measured."""
from __future__ import annotations

from pathlib import Path

import torch


def check_files_hold(served: torch.nn.Module, out_dir: Path) -> None:
    """The export's files, read back shard by shard, hold what the in-memory served model stores
    (float tensors, written in the export dtype, compared in the served model's float32): what
    was measured is what was written, with one shard in memory at a time, not a second model."""
    from qat.export.compressed_tensors import stored_tensors
    from qat.format.shards import iter_tensors, weight_files

    mine = stored_tensors(served, torch.float32)[0]
    found: set[str] = set()
    for path in weight_files(out_dir):
        for key, theirs in iter_tensors(path):  # one tensor in memory at a time
            if key not in mine:
                raise OSError(f"{out_dir}: tensor {key!r} is not in the converted model")
            ok = theirs.is_floating_point() == mine[key].is_floating_point() and (
                theirs.dtype == mine[key].dtype or theirs.is_floating_point())
            if not ok or not torch.equal(theirs.to(mine[key].dtype), mine[key]):
                raise OSError(f"{out_dir}: tensor {key!r} read back differs from the "
                              "converted model")
            found.add(key)
    if found != set(mine):
        raise OSError(f"{out_dir}: the export read back has other tensors than the converted model "
                      f"({sorted(found ^ set(mine))[:3]})")
