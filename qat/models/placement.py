"""Where the stages compute (`model.device`), and a host-resident model run there block by block.

The model lives on the host (or, onloaded, in its files). A stage that computes on an accelerator
moves what it needs there and back: the whole model when it fits the device's free memory, else
the parts outside the decoder blocks once and each block only while it runs (what llm-compressor
calls sequential onloading), so a 70B model's perplexity needs one block of device memory. On the
host (`cpu`) every function here is a no-op: CPU runs are what they were.

    device = stage_device("auto", accelerator="auto")    # cuda:0 when one is visible, else cpu
    with computing_on(model, device): perplexity(...)     # whole-model stages
    with block_on(block, device): train(block)            # stages that go block by block
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from qat.models.spec import check_device_name
from qat.models.structure import decoder_blocks

FIT_FRACTION = 0.6  # of the device's free memory a whole model may take (activations need room)


def stage_device(name: str, accelerator: str = "auto", field: str = "model.device"
                 ) -> torch.device:
    """The device the stages compute on. `auto`: the trainer's accelerator, i.e. the first CUDA
    device when one is visible and `trainer.accelerator` is not cpu, else the host."""
    check_device_name(name, field)
    if name == "auto":
        if str(accelerator) in ("auto", "gpu", "cuda") and torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{field}={name!r}: no CUDA device is visible to torch "
                             f"{torch.__version__}; use {field}=cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{field}={name!r}: only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 natively (a CUDA GPU with bf16, a CPU with AVX-512 BF16 or
    AMX): only there is bf16 compute faster than float32 (1.5x a KD step here, bench/bf16_speed.py);
    elsewhere it is emulated and slower."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


@lru_cache(maxsize=1)
def _cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags, read once (every block of the block stage asks)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def home_of(module: nn.Module) -> torch.device:
    """Where a module's real tensors are (the host for one with none, or only meta ones)."""
    for t in (*module.parameters(), *module.buffers()):
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def _move(module: nn.Module, device: torch.device, recurse: bool = True) -> None:
    """Real tensors to `device` in place (meta ones, an onloaded block's, stay meta)."""
    module._apply(lambda t: t if t.device.type == "meta" else t.to(device), recurse=recurse)


@contextmanager
def block_on(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """`block` on `device` for the body, back where it was after (with what the body changed)."""
    home = home_of(block)
    if _same(home, device):
        yield block
        return
    _move(block, device)
    try:
        yield block
    finally:
        _move(block, home)


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
               if t.device.type != "meta")


def fits(model: nn.Module, device: torch.device) -> bool:
    """Whether the whole model may move to `device` (CUDA: FIT_FRACTION of its free memory)."""
    if device.type != "cuda":
        return True
    free, _ = torch.cuda.mem_get_info(device)
    return model_bytes(model) <= FIT_FRACTION * free


def move_residents(model: nn.Module, device: torch.device) -> None:
    """The parts of `model` outside its decoder blocks (embeddings, final norm, head, rotary
    tables) to `device` in place (tied tensors stay tied), and an onloaded model's blocks read
    onto it from then on; the blocks themselves stay where they are."""
    from qat.models.onload import onloader_of

    _, blocks = decoder_blocks(model)
    inside = {id(m) for b in blocks for m in b.modules()}
    for module in model.modules():
        if id(module) not in inside:
            _move(module, device, recurse=False)
    loader = onloader_of(model)
    if loader is not None:
        loader.device = device


@contextmanager
def residents_on(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """`move_residents` for the body, and back after; the blocks are the caller's to move
    (`block_on`)."""
    from qat.models.onload import onloader_of

    device = torch.device(device)
    home = home_of(model)
    if _same(home, device):
        yield model
        return
    loader = onloader_of(model)
    loader_home = loader.device if loader is not None else home
    move_residents(model, device)
    try:
        yield model
    finally:
        move_residents(model, home)
        if loader is not None:
            loader.device = loader_home


@contextmanager
def computing_on(model: nn.Module, device: torch.device | str, whole: bool | None = None
                 ) -> Iterator[nn.Module]:
    """`model(...)` computes on `device` in the body; everything is back where it was after.
    `whole`: move the whole model (default: when it fits) or each block only while it runs. An
    onloaded model's blocks are read from its files onto `device`."""
    device = torch.device(device)
    home = home_of(model)
    if _same(home, device):
        yield model
        return
    whole = fits(model, device) if whole is None else whole
    _, blocks = decoder_blocks(model)
    handles = []
    if whole:
        for block in blocks:
            _move(block, device)
    else:
        def onload(block, args, kwargs):
            _move(block, device)
            return to_device(args, device), to_device(kwargs, device)

        for block in blocks:
            handles.append(block.register_forward_pre_hook(onload, with_kwargs=True))
            handles.append(block.register_forward_hook(lambda b, a, out: _move(b, home)))
    try:
        with residents_on(model, device):
            yield model
    finally:
        for handle in handles:
            handle.remove()
        for block in blocks:  # also one a failed forward left on the device
            _move(block, home)
