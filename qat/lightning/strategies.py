"""Multi-device strategies that need more than a YAML file can say: FSDP2 (trainer=fsdp2), its
blocks sharded from the model's structure and its checkpoints written shard by shard.

Lightning's FSDP1 strategy (trainer=fsdp until 2026-12) is gone: it ran on CUDA only, so never
in a test here, and wrapped decoder blocks by a list of class names; FSDP2 finds them from the
structure and runs on CPUs (gloo) too."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from torch import nn

from qat.models.checkpoint import is_distributed


DTYPES = ("float32", "bfloat16", "float16")  # FSDP2's compute and reduce dtypes (or null)


def shard_blocks(model: nn.Module, mesh, param_dtype: str | None = None,
                 reduce_dtype: str | None = None) -> int:
    """FSDP2: `fully_shard` each decoder block (found from the structure: any architecture, MoE
    blocks with their experts included), then the rest (embeddings, final norm, head) as one
    unit. Each block's parameters are gathered for its forward and backward only. Returns the
    number of blocks sharded."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from qat.models.structure import decoder_blocks

    policy = MixedPrecisionPolicy(
        param_dtype=getattr(torch, param_dtype) if param_dtype else None,
        reduce_dtype=getattr(torch, reduce_dtype) if reduce_dtype else None)
    _, blocks = decoder_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    # the root (embeddings, final norm, head) stays gathered from its forward to its backward:
    # distillation applies the head in chunks after the forward (qat.distill.decoder_output)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    return len(blocks)


def fill_shards(model: nn.Module, device, full: dict | None = None,
                from_rank0: bool = False) -> None:
    """A sharded model's shards made on `device` where they are still on the meta device (the
    model was built there), and with `from_rank0` filled from rank 0's full state dict `full`
    (None on the other ranks: every rank calls this, each keeps its own rows of what rank 0
    sends). Without it, a checkpoint fills them. Buffers computed when the model was built
    (rotary tables) keep their values."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        built = {name: b for name, b in model.named_buffers() if not b.is_meta}
        model.to_empty(device=device)
        for name, buffer in built.items():
            owner, _, leaf = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[leaf] = buffer.to(device)
    if from_rank0:
        set_model_state_dict(model, full or {}, options=StateDictOptions(
            full_state_dict=True, broadcast_from_rank0=True))


def shard_model(model: nn.Module, strategy, from_rank0: bool = False) -> None:
    """`strategy.shard(model)` on every rank. `from_rank0`: the other ranks built the model on
    the meta device; they first take on rank 0's layout (`match_layout`), then receive their
    own shards of rank 0's tensors (`fill_shards`). A model still on meta without it (a
    resumed run) gets empty shards for the checkpoint to fill."""
    full = None
    if from_rank0:
        zero = strategy.global_rank == 0
        full = model.state_dict() if zero else None
        layout = strategy.broadcast({k: (tuple(v.shape), v.dtype) for k, v in full.items()}
                                    if zero else None)
        if not zero:
            match_layout(model, layout)
    strategy.shard(model)
    if from_rank0 or any(p.is_meta for p in model.parameters()):
        fill_shards(model, strategy.root_device, full, from_rank0)


def match_layout(model: nn.Module, layout: dict[str, tuple[tuple[int, ...], Any]],
                 device="meta") -> None:
    """`model` takes on the tensors that the model of `layout` (a state dict as name -> (shape,
    dtype): rank 0's, a checkpoint's) has and it lacks or holds in another shape: the grids a
    calibration fixed, a moving-average observer's range; made by the layers' own load hooks,
    empty on `device` (meta: before sharding, so that every rank shards alike)."""
    import torch

    own = model.state_dict(keep_vars=True)
    wanted = {name: torch.empty(shape, dtype=dtype, device=device)
              for name, (shape, dtype) in layout.items()
              if name not in own or tuple(own[name].shape) != tuple(shape)}
    if wanted:
        model.load_state_dict(wanted, strict=False, assign=True)


def fsdp2(param_dtype: str | None = None, reduce_dtype: str | None = "float32",
          save_distributed_checkpoint: bool = True, **kwargs: Any):
    """Lightning's ModelParallelStrategy as FSDP2 over every rank (data parallel size = world
    size, no tensor parallelism); the model's `configure_model` calls `strategy.shard(model)`.
    param_dtype: the dtype blocks compute in (None: their own; bfloat16 on GPUs), reduce_dtype:
    the gradients' all-reduce dtype. Checkpoints are distributed: a directory in which each rank
    writes its own shards (no rank gathers the model), made under a temporary name and renamed
    when every rank is done; `save_distributed_checkpoint=false` gathers them into one file on
    rank zero instead."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value is not None and value not in DTYPES:
            raise ValueError(f"trainer.strategy.{name}={value!r} is not allowed; one of "
                             f"{list(DTYPES)} or null")

    class FSDP2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def shard(self, model: nn.Module) -> int:
            return shard_blocks(model, self.device_mesh["data_parallel"], param_dtype,
                                reduce_dtype)

        def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options=None):
            if not self._save_distributed_checkpoint:
                return super().save_checkpoint(checkpoint, filepath, storage_options)
            save_sharded(self, checkpoint, Path(self.broadcast(filepath)),
                         super().save_checkpoint)

        def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None):
            path = Path(self.broadcast(checkpoint_path))
            if not is_distributed(path):  # one gathered file: Lightning's, weights only
                return super().load_checkpoint(path, weights_only=True)
            return load_sharded(self.lightning_module, self.optimizers, path)

    return FSDP2Strategy(save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)


def save_sharded(strategy, checkpoint: dict[str, Any], path: Path, write) -> None:
    """A distributed checkpoint at `path`, never half-written: every rank writes its shards into
    `.NAME.tmp` beside it (`write`: Lightning's own save), and once all are done rank zero
    replaces `path` by it; a crash before leaves the previous checkpoint and a stale temporary
    (removed on resume, `remove_stale_temporaries`)."""
    tmp, old = (path.with_name(f".{path.name}.{tag}") for tag in ("tmp", "old.tmp"))
    if strategy.global_rank == 0:
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
    strategy.barrier()
    write(checkpoint, tmp)
    strategy.barrier()
    if strategy.global_rank == 0:
        if path.is_file():
            path.unlink()
        elif path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()


def load_sharded(module: nn.Module, optimizers: list, path: Path) -> dict[str, Any]:
    """Each rank's shards of a distributed checkpoint into the sharded `module` and its
    optimizers (as Lightning's loader, with the checkpoint read as data: tensors and plain
    values only); returns the rest of the checkpoint (loops, schedules, callbacks, qat)."""
    import torch
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict,
                                                         set_optimizer_state_dict)

    from qat.models.checkpoint import META_FILE, load_distributed, stored_tensors

    # buffers the model makes when it first runs or is calibrated (an observer's range, a
    # static grid): made here at their stored size, as a one-file checkpoint's load makes them
    start = "state_dict."
    match_layout(module, {k[len(start):]: v for k, v in stored_tensors(path).items()
                          if k.startswith(start)}, device=module.device)
    state = {"state_dict": get_model_state_dict(module)}
    load_distributed(state, path)
    module.load_state_dict(state["state_dict"], strict=module.strict_loading)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        state = {key: get_optimizer_state_dict(module, optimizer)}
        load_distributed(state, path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)
