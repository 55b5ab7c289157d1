"""Which weights file holds which tensor: one `model.safetensors`, or the Hugging Face sharded
convention (`model-00001-of-00003.safetensors` ... and `model.safetensors.index.json` mapping every
tensor to its file), which transformers, compressed-tensors and vLLM all read.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(value: int | str, field: str = "export.max_shard_size") -> int:
    """Bytes from 123, "500MB", "5GB" or "2GiB" (decimal units as Hugging Face counts them)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), re.IGNORECASE)
        if not found:
            raise ValueError(f"{field}={value!r} is not a size: give bytes or a number with KB, "
                             "MB, GB (or KiB, MiB, GiB)")
        size = int(float(found[1]) * _UNITS[(found[2] or "").upper()])
    if size < 1:
        raise ValueError(f"{field}={value!r} must be at least one byte")
    return size


def plan_shards(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Tensor names in order, cut into files of at most `max_bytes` (a larger tensor alone)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def shard_name(index: int, count: int) -> str:
    """The file of shard `index` (0-based) of `count`; one shard is plain model.safetensors."""
    return WEIGHTS_FILE if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def weight_map(directory: Path) -> dict[str, str]:
    """tensor name -> file name, from the index (sharded) or {} when there is one file."""
    index = Path(directory) / INDEX_FILE
    if not index.is_file():
        return {}
    try:
        mapping = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{index}: not a weights index ({err})") from err
    return {str(k): str(v) for k, v in mapping.items()}


def weight_files(directory: Path) -> list[Path]:
    """The weights files of a model directory, in order."""
    directory = Path(directory)
    mapping = weight_map(directory)
    if mapping:
        return [directory / name for name in sorted(set(mapping.values()))]
    return [directory / WEIGHTS_FILE]


_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
           "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
           "BOOL": "bool"}


def read_header(path: Path) -> tuple[int, dict[str, dict]]:
    """(where the data starts, {tensor name: its dtype, shape and data offsets}) of a safetensors
    file."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        try:
            header = json.loads(f.read(size))
        except ValueError as err:
            raise ValueError(f"{path}: not a safetensors file ({err})") from err
    header.pop("__metadata__", None)
    return 8 + size, header


def stored_dtype(info: dict):
    """The torch dtype of a header entry, or None for one plain reads do not handle (fp8 ...)."""
    import torch

    name = _DTYPES.get(info["dtype"])
    return getattr(torch, name) if name else None


def read_into(f, start: int, info: dict, out, where: str):
    """Read one tensor's bytes from the open file `f` (data starting at `start`) straight into
    `out`: a contiguous CPU tensor of its stored dtype and shape. Plain reads, no memory map: a
    map's touched pages count as the process's memory for as long as the file is mapped, and
    faulting them in costs more than reading."""
    import torch

    begin, end = info["data_offsets"]
    raw = out.reshape(-1).view(torch.uint8)
    if end - begin and os.preadv(f.fileno(), [memoryview(raw.numpy())], start + begin) != end - begin:
        raise ValueError(f"{where}: tensor is truncated")
    return out


def iter_tensors(path: Path):
    """(name, tensor) for each tensor of a safetensors file, in file order, each read into memory
    of its own with plain reads (`read_into`): checking a 5 GB shard through a memory map would
    cost 5 GB."""
    import torch

    start, header = read_header(path)
    with open(path, "rb") as f:
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            tensor = torch.empty(info["shape"], dtype=getattr(torch, _DTYPES[info["dtype"]]))
            yield name, read_into(f, start, info, tensor, f"{path}: {name!r}")
