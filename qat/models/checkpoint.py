"""Rebuild the fake-quantized model from a run checkpoint alone (the run config lives inside it).

A checkpoint is one file (`torch.save`, one process or DDP) or a distributed checkpoint: a
directory of each rank's shards (FSDP2, torch.distributed.checkpoint) with Lightning's `meta.pt`
beside them. Both are read here in one process, as data, never code; a distributed one tensor
by tensor, so a model larger than memory is rebuilt a block at a time
(`qat.export.convert.served_from_checkpoint`).

Below the trainer: the export and eval commands read runs without importing Lightning.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import nn

META_FILE = "meta.pt"  # Lightning's name for the non-tensor part of a distributed checkpoint
SHARDS_INDEX = ".metadata"  # torch.distributed.checkpoint's index of the shard files
MODEL_PREFIX = "state_dict."  # the model's tensors among a distributed checkpoint's keys


def is_distributed(path: str | Path) -> bool:
    """Whether `path` is a distributed (sharded) checkpoint directory."""
    return (Path(path) / SHARDS_INDEX).is_file()


# the classes a distributed checkpoint's index pickles: its own dataclasses and the torch types
# they hold; anything else in the file is refused (a plain unpickler would run it)
_INDEX_MODULES = ("torch.distributed.checkpoint.",)
_INDEX_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"),
                  ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),
                  ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                  ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset")}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module.startswith(_INDEX_MODULES):  # its classes (dataclasses, enums), no function
            found = super().find_class(module, name)
            if isinstance(found, type):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint index")


def _reader(path: Path):
    """torch's FileSystemReader, with the index read by an unpickler that builds only the
    index's own classes (torch's reader unpickles it unrestricted)."""
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            from torch.distributed.checkpoint.metadata import StorageMeta

            with open(Path(self.path) / SHARDS_INDEX, "rb") as f:
                metadata = _IndexUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def _planner():
    """torch's DefaultLoadPlanner, with non-tensor entries (an optimizer's hyperparameters) read
    with weights_only=True (torch's reads them with weights_only=False)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from torch.distributed.checkpoint._traverse import set_element

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn],
                            obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafePlanner()


def stored_tensors(path: str | Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """(shape, dtype) of each tensor of a distributed checkpoint, by its key there."""
    index = _reader(Path(path)).read_metadata().state_dict_metadata
    return {key: (meta.size, meta.properties.dtype) for key, meta in index.items()
            if hasattr(meta, "size")}


def load_distributed(state: dict[str, Any], path: str | Path, no_dist: bool = False) -> None:
    """torch.distributed.checkpoint.load of `state` (filled in place) from the checkpoint at
    `path`, as data only. `no_dist`: this process alone reads, whatever process group exists."""
    import warnings

    from torch.distributed.checkpoint import load

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process")
        load(state, storage_reader=_reader(Path(path)), planner=_planner(), no_dist=no_dist)


def read_checkpoint(path: str | Path, tensors: bool = True) -> dict[str, Any]:
    """A checkpoint written by train.py, loaded without unpickling arbitrary objects: a file
    whole, a distributed checkpoint's `meta.pt` with (`tensors`) its model's tensors gathered
    into "state_dict", under the names a one-file checkpoint gives them.

    Raises FileNotFoundError or ValueError naming `--ckpt`."""
    path = Path(path)
    distributed = is_distributed(path)
    file = path / META_FILE if distributed else path
    if not file.is_file():
        raise FileNotFoundError(f"--ckpt {path}: no such checkpoint file"
                                + (f" (a directory without {META_FILE})" if path.is_dir() else ""))
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated, corrupted, or not a torch file
        raise ValueError(f"--ckpt {path}: cannot be read as a checkpoint ({err})") from err
    if distributed and isinstance(ckpt, dict) and tensors:
        source = CheckpointTensors(path)
        ckpt["state_dict"] = {f"model.{k}": v for k, v in source.read(source.names()).items()}
    if not isinstance(ckpt, dict) or "qat" not in ckpt \
            or ("state_dict" not in ckpt and (tensors or not distributed)):
        raise ValueError(f"--ckpt {path}: not a qat run checkpoint (no state_dict / qat config)")
    return ckpt


class CheckpointTensors:
    """The model's tensors in a run checkpoint by their names in the model, read when asked
    for: a one-file checkpoint's from its state dict, a distributed one's from the shard files
    (only the named tensors, in one process)."""

    def __init__(self, path: str | Path, ckpt: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self._state = None
        self._meta: dict[str, tuple[torch.Size, torch.dtype]] = {}
        if is_distributed(self.path):
            start = MODEL_PREFIX + "model."
            self._meta = {key[len(start):]: stored for key, stored in
                          stored_tensors(self.path).items() if key.startswith(start)}
        else:
            ckpt = ckpt if ckpt is not None else read_checkpoint(self.path)
            self._state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}

    def names(self) -> list[str]:
        return list(self._state if self._state is not None else self._meta)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        if self._state is not None:
            return {name: self._state[name] for name in names}
        out = {name: torch.empty(self._meta[name][0], dtype=self._meta[name][1]) for name in names}
        load_distributed({MODEL_PREFIX[:-1]: {f"model.{k}": v for k, v in out.items()}},
                         self.path, no_dist=True)
        return out


def skeleton(config: dict[str, Any]) -> tuple[nn.Module, Any]:
    """The run's model as its config builds it (shrunk, linearized, fake-quantized), its
    parameters on the meta device for a checkpoint's tensors to fill."""
    from hydra.utils import instantiate

    from qat.models.load import load_skeleton

    model, tokenizer = load_skeleton(instantiate(config["model"]))
    if config.get("model_shrink"):  # structured pruning cut heads / channels: rebuild smaller
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from qat.models.experts import unfuse

        for key, value in config["model_shrink"].items():
            setattr(model.config, key, value)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(model.config, dtype=model.dtype)
        unfuse(model)  # as load_model gives it: MoE experts as Linears
    if instantiate(config["prune"]).enabled:  # pruning made every Conv1D a Linear (start_pruning)
        from qat.models.structure import linearize

        linearize(model)
    quant = instantiate(config["quant"])  # qat.quant.QuantConfig, as the run's config names it
    if quant.weight is not None:
        quant.prepare(model)
    return model.eval(), tokenizer


def fill(module: nn.Module, tensors: CheckpointTensors, prefix: str,
          names: list[str] | None = None) -> tuple[list[str], list[str]]:
    """`module`'s tensors (`prefix`: its name in the model) from the checkpoint's tensors under
    `prefix` (or `names`), assigned as read, with no copy into the meta tensors; the layers'
    own load hooks reshape what they hold (a codes-held layer keeps codes, not a weight).
    Returns the (missing, unexpected) names in the model."""
    names = names if names is not None else [n for n in tensors.names() if n.startswith(prefix)]
    read = tensors.read(names)
    result = module.load_state_dict({n[len(prefix):]: read[n] for n in names}, assign=True,
                                    strict=False)
    return ([prefix + n for n in result.missing_keys],
            [prefix + n for n in result.unexpected_keys])


def model_from_checkpoint(path: str | Path) -> tuple[nn.Module, Any, dict[str, Any]]:
    """(fake-quantized model with the trained weights, tokenizer, run config)."""
    path = Path(path)
    ckpt = read_checkpoint(path, tensors=False)
    model, tokenizer = skeleton(ckpt["qat"]["config"])
    tensors = CheckpointTensors(path, ckpt if "state_dict" in ckpt else None)
    check_filled(model, path, *fill(model, tensors, ""))
    return model.eval(), tokenizer, ckpt["qat"]["config"]


def check_filled(model: nn.Module, path: Path, missing: list[str], unexpected: list[str]) -> None:
    """Tie the head (when the config ties it: a checkpoint may not store it) and refuse a
    checkpoint that does not fill the model its config builds."""
    tied = getattr(model.config.get_text_config(), "tie_word_embeddings", False)
    if tied and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n in missing if not (tied and n.endswith("lm_head.weight"))] + [
        n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing or unexpected:
        raise ValueError(f"--ckpt {path}: weights do not match the model built from its config "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
