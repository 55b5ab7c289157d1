"""Multi-device strategies that need more than a YAML file can say."""
from __future__ import annotations

import functools
from typing import Any, Iterable

from torch import nn


def _wrap_by_name(module: nn.Module, recurse: bool, nonwrapped_numel: int,
                  names: frozenset[str]) -> bool:
    return recurse or type(module).__name__ in names


def fsdp(wrap: Iterable[str] = ("LlamaDecoderLayer",), **kwargs: Any):
    """Lightning's FSDPStrategy with one FSDP unit per module whose class name is in `wrap`.

    Class names, not classes, so one config serves every architecture; kwargs go to FSDPStrategy.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    policy = functools.partial(_wrap_by_name, names=frozenset(wrap))
    return FSDPStrategy(auto_wrap_policy=policy, **kwargs)


DTYPES = {None: None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


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


def fsdp2(param_dtype: str | None = None, reduce_dtype: str | None = "float32", **kwargs: Any):
    """Lightning's ModelParallelStrategy as FSDP2 over every rank (data parallel size = world
    size, no tensor parallelism); the model's `configure_model` calls `strategy.shard(model)`.
    param_dtype: the dtype blocks compute in (None: their own; bfloat16 on GPUs), reduce_dtype:
    the gradients' all-reduce dtype. Checkpoints are gathered into one file on rank zero."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value not in DTYPES:
            raise ValueError(f"trainer.strategy.{name}={value!r} is not allowed; one of "
                             f"{[k for k in DTYPES if k]} or null")

    class FSDP2Strategy(ModelParallelStrategy):
        def setup_environment(self) -> None:
            self._data_parallel_size = self.num_nodes * self.num_processes
            self._tensor_parallel_size = 1
            super().setup_environment()

        def shard(self, model: nn.Module) -> int:
            return shard_blocks(model, self.device_mesh["data_parallel"], param_dtype,
                                reduce_dtype)

    kwargs.setdefault("save_distributed_checkpoint", False)
    return FSDP2Strategy(**kwargs)
