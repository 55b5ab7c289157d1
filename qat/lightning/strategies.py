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

    state = {"state_dict": get_model_state_dict(module)}
    stored = stored_tensors(path)
    for key, tensor in state["state_dict"].items():
        # a buffer the model sizes when it first runs (a moving-average observer's range): read
        # at its stored size, for the layer's load hook to take (as from a one-file checkpoint)
        shape, dtype = stored.get(f"state_dict.{key}", (tensor.shape, tensor.dtype))
        if type(tensor) is torch.Tensor and tensor.shape != shape:
            state["state_dict"][key] = torch.empty(shape, dtype=dtype, device=tensor.device)
    load_distributed(state, path)
    module.load_state_dict(state["state_dict"], strict=module.strict_loading)
    for index, optimizer in enumerate(optimizers):
        key = f"optimizer_{index}"
        state = {key: get_optimizer_state_dict(module, optimizer)}
        load_distributed(state, path)
        set_optimizer_state_dict(module, optimizer, optim_state_dict=state[key],
                                 options=StateDictOptions(cpu_offload=True))
    return torch.load(path / META_FILE, map_location="cpu", weights_only=True)
