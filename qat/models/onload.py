"""A frozen model whose decoder blocks stay in their safetensors files.

The float model a run reads but never trains (the distillation teacher, the block stage's
targets) is a skeleton: its small tensors (embeddings, final norm, head, rotary tables) are in
memory, each decoder block's tensors are read from the files (cast to the model's dtype, moved to
its device) only while that block runs, and dropped after. It costs one block of memory, where a
copy of the model cost the whole model again.

    teacher = onloaded_model(directory, torch.float32)      # None: the files do not match
    teacher(input_ids)                                        # each block read, run, dropped
    with held(block): ...                                     # one block kept over many calls
    move(teacher, "cuda")                                     # blocks then read onto the GPU
"""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from torch import nn

from qat.format.shards import WEIGHTS_FILE, read_header, read_into, stored_dtype, weight_map
from qat.io import release_memory
from qat.models.experts import checkpoint_name, unfuse
from qat.models.structure import decoder_blocks


class TensorFiles:
    """Which safetensors file of a model directory holds each tensor, and reading them."""

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        mapping = weight_map(self.directory)
        self._headers: dict[Path, tuple[int, dict]] = {}
        if not mapping:
            single = self.directory / WEIGHTS_FILE
            if not single.is_file():
                raise FileNotFoundError(f"{self.directory}: no {WEIGHTS_FILE} and no index")
            mapping = {name: WEIGHTS_FILE for name in self._header(single)[1]}
        self.file_of = {name: self.directory / file for name, file in mapping.items()}

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            self._headers[file] = read_header(file)
        return self._headers[file]

    def _info(self, file: Path, name: str) -> dict:
        header = self._header(file)[1]
        if name not in header:
            raise ValueError(f"{file}: tensor {name!r}, listed in the index, is missing")
        return header[name]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: tuple(self._info(file, name)["shape"]) for name, file in self.file_of.items()}

    def read(self, names: list[str], dtype: torch.dtype | None, device: torch.device | str,
             into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The named tensors, in `dtype` on `device` (floating ones cast, others as stored; None:
        all as stored).

        Plain reads into memory of the run's own (`qat.format.shards.read_into`), never views of
        a memory map: a mapped page read counts as the process's memory while the file is mapped,
        and faulting pages in cost 4x the read. `into`: tensors to fill (by name) where shape,
        dtype and device match, instead of new ones; one already in the stored dtype on the host
        is read into directly, with no copy at all."""
        device = torch.device(device)
        into = into or {}
        out = {}
        for file, group in self._by_file(names).items():
            start = self._header(file)[0]
            with open(file, "rb", buffering=0) as f:
                for name in group:
                    info = self._info(file, name)
                    stored = stored_dtype(info)  # None: a dtype plain reads do not know (fp8)
                    t = None if stored is not None else _read_mapped(file, name)
                    kind = stored if stored is not None else t.dtype
                    want = (dtype or kind) if kind.is_floating_point else kind
                    buffer = into.get(name)
                    if buffer is not None and (tuple(buffer.shape) != tuple(info["shape"])
                                               or buffer.dtype != want or buffer.device != device):
                        buffer = None
                    if t is None and buffer is not None and want == stored \
                            and device.type == "cpu" and buffer.is_contiguous():
                        out[name] = read_into(f, start, info, buffer, f"{file}: {name!r}")
                        continue
                    if t is None:
                        t = read_into(f, start, info, torch.empty(info["shape"], dtype=stored),
                                      f"{file}: {name!r}")
                    out[name] = buffer.copy_(t) if buffer is not None \
                        else t.to(device=device, dtype=want)
        return out

    def _by_file(self, names: list[str]) -> dict[Path, list[str]]:
        out: dict[Path, list[str]] = {}
        for name in names:
            out.setdefault(self.file_of[name], []).append(name)
        return out


def _read_mapped(file: Path, name: str) -> torch.Tensor:
    """One tensor through safetensors (dtypes plain reads do not know), copied off the map."""
    try:
        with safe_open(str(file), framework="pt") as mapped:
            return mapped.get_tensor(name).clone()
    except Exception as err:  # noqa: BLE001 - safetensors' own error types
        raise ValueError(f"{file}: tensor {name!r} is unreadable ({err})") from err


def _set(root: nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    if leaf in module._parameters:
        module._parameters[leaf] = tensor if isinstance(tensor, nn.Parameter) \
            else nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


MAX_SPARE = 1  # spare blocks' tensors kept for reuse: blocks are held one at a time


class Onloader:
    """Reads a block's tensors into it before it runs and drops them after (see module doc)."""

    def __init__(self, files: TensorFiles, names: dict[int, dict[str, str]],
                 dtype: torch.dtype, device: torch.device) -> None:
        self.files, self.names, self.dtype, self.device = files, names, dtype, device
        self._held: dict[int, int] = {}  # id(block) -> nesting depth
        # the tensors of dropped blocks, by local name, for the next block read to copy into:
        # reading block after block then allocates nothing, so the C heap neither grows nor
        # fragments; it is returned to the kernel once per pass over the blocks (per block, that
        # cost a quarter of a forward pass)
        self._spare: list[dict[str, torch.Tensor]] = []
        self._last = next(reversed(names), None)  # id of the last block: a pass over the model ends

    def load(self, block: nn.Module, reuse: bool = False) -> None:
        names = self.names[id(block)]  # local name -> name in the files
        spare = self._spare.pop() if reuse and self._spare else {}
        tensors = self.files.read(list(names.values()), self.dtype, self.device,
                                  into={stored: spare[local] for local, stored in names.items()
                                        if local in spare})
        for local, stored in names.items():
            _set(block, local, tensors[stored])

    def drop(self, block: nn.Module, keep: bool = False) -> None:
        """The block's tensors back to the meta device (`keep`: kept as the next read's spare)."""
        spare = {}
        for local in self.names[id(block)]:
            tensor = block.get_parameter(local) if _is_param(block, local) \
                else block.get_buffer(local)
            spare[local] = tensor.detach()
            _set(block, local, nn.Parameter(torch.empty_like(tensor, device="meta"),
                                            requires_grad=False)
                 if _is_param(block, local) else torch.empty_like(tensor, device="meta"))
        if keep and len(self._spare) < MAX_SPARE:
            self._spare.append(spare)

    @contextmanager
    def held(self, block: nn.Module) -> Iterator[nn.Module]:
        key = id(block)
        # without gradients nothing outlives the block's use of its tensors: they can be reused
        reuse = not torch.is_grad_enabled()
        if not self._held.get(key):
            self.load(block, reuse)
        self._held[key] = self._held.get(key, 0) + 1
        try:
            yield block
        finally:
            self._held[key] -= 1
            if not self._held[key]:
                self.drop(block, keep=reuse and key != self._last)
                if key == self._last:  # a pass ends: its spare tensors and freed heap returned
                    self._spare.clear()
                    release_memory()

    def adopt(self, block: nn.Module) -> None:
        """Read the block's tensors into it for good (trainable, as a loaded model's are): from
        now on it is an ordinary module, which a stage may quantize and keep."""
        if block.__dict__.get("_onloader") is not self:
            return
        self.load(block)
        for p in block.parameters():
            p.requires_grad_(True)
        del block.__dict__["forward"], block.__dict__["_onloader"]

    def read(self, block: nn.Module, local: list[str]) -> dict[str, torch.Tensor]:
        """Tensors of `block` by their names in it, as the files hold them (cast, moved)."""
        names = self.names[id(block)]
        tensors = self.files.read([names[n] for n in local], self.dtype, self.device)
        return {n: tensors[names[n]] for n in local}

    def run(self, block: nn.Module, *args, **kwargs):
        with self.held(block):
            return type(block).forward(block, *args, **kwargs)


def _is_param(module: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf in (module.get_submodule(owner) if owner else module)._parameters


def held(block: nn.Module):
    """Keep an onloaded block's tensors in memory for the `with` body (a no-op for a block of
    an ordinary model): a stage that calls one block many times reads it once."""
    loader = block.__dict__.get("_onloader")
    return loader.held(block) if loader is not None else nullcontext(block)


def plain_copy(block: nn.Module) -> nn.Module:
    """A deep copy of a decoder block as an ordinary module, its tensors in memory (an onloaded
    block's read from the files for the copy; the block itself stays in them)."""
    import copy

    loader = block.__dict__.get("_onloader")
    if loader is None:
        return copy.deepcopy(block)
    with loader.held(block):
        twin = copy.deepcopy(block, {id(loader): loader})  # the loader itself is not copied
    for key in ("forward", "_onloader"):
        twin.__dict__.pop(key, None)
    return twin


def move(model: nn.Module, device: torch.device | str) -> nn.Module:
    """model.to(device), for an onloaded model too: its resident tensors move, its blocks are read
    onto `device` from then on."""
    if model.__dict__.get("_onloader") is None:
        return model.to(device)
    from qat.models.placement import move_residents

    move_residents(model, torch.device(device))
    return model


def _tie(model: nn.Module) -> None:
    """The head shares the input embeddings' tensor when the config ties them."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    head = model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and head is not None:
        head.weight = model.get_input_embeddings().weight


def onloaded_model(directory: str | Path, dtype: torch.dtype, *, trust_remote_code: bool = False,
                   attn_implementation: str | None = None, frozen: bool = True
                   ) -> nn.Module | None:
    """The model of `directory` with its blocks left in the files, in eval mode; None when the
    files' tensor names are not the model's own (a checkpoint transformers converts while
    loading): the caller then loads it whole. `frozen=False`: a student, whose resident tensors
    train and whose blocks a stage adopts (`Onloader.adopt`) one by one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with init_empty_weights():  # parameters on meta; buffers (rotary tables) computed as usual
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 trust_remote_code=trust_remote_code, **kwargs)
    unfuse(model)  # MoE experts as Linears, named as the checkpoint names them
    files = TensorFiles(directory)
    shapes = files.shapes()
    tied = getattr(config.get_text_config(), "tie_word_embeddings", False)
    head = model.get_output_embeddings()
    head_ids = {id(head.weight)} if tied and head is not None else set()
    runtime = {n: tuple(p.shape) for n, p in model.named_parameters() if id(p) not in head_ids}
    runtime.update({n: tuple(b.shape) for n, b in model.named_buffers() if n in shapes})
    stored = {n: checkpoint_name(config, n) for n in runtime}  # runtime name -> name in the files
    wanted = {stored[n]: shape for n, shape in runtime.items()}
    if set(wanted) != set(shapes) - _head_name(model, tied) \
            or any(shapes[n] != s for n, s in wanted.items()):
        return None
    prefix, blocks = decoder_blocks(model)
    names: dict[int, dict[str, str]] = {}
    resident = dict(stored)
    for index, block in enumerate(blocks):
        start = f"{prefix}.{index}."
        names[id(block)] = {n[len(start):]: stored[n] for n in runtime if n.startswith(start)}
        resident = {n: f for n, f in resident.items() if not n.startswith(start)}
    device = torch.device("cpu")
    tensors = files.read(list(resident.values()), dtype, device)
    for name, file_name in resident.items():
        _set(model, name, tensors[file_name])
    if tied:
        _tie(model)
    loader = Onloader(files, names, dtype, device)
    model.__dict__["_onloader"] = loader
    for block in blocks:
        block.__dict__["_onloader"] = loader
        block.forward = functools.partial(loader.run, block)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(not frozen and p.device.type != "meta")
    return model


def onloader_of(model: nn.Module) -> Onloader | None:
    return model.__dict__.get("_onloader")


def _head_name(model: nn.Module, tied: bool) -> set[str]:
    """The head's tensor name, which a tied checkpoint may or may not store."""
    if not tied:
        return set()
    head = model.get_output_embeddings()
    return {n for n, m in model.named_modules() if m is head for n in (f"{n}.weight",)}


def reads_blocks(model: nn.Module) -> bool:
    """Whether some decoder block of `model` is still read from its files when it runs."""
    return is_onloaded(model) and any("_onloader" in block.__dict__
                                      for block in decoder_blocks(model)[1])


def is_onloaded(model: nn.Module) -> bool:
    return "_onloader" in model.__dict__
