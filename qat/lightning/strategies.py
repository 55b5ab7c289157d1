"""Multi-device strategies that need more than a YAML file can say: FSDP2 (trainer=fsdp2).

Lightning's FSDP1 strategy (trainer=fsdp until 2026-12) is gone: it ran on CUDA only, so never
in a test here, and wrapped decoder blocks by a list of class names; FSDP2 finds them from the
structure and runs on CPUs (gloo) too."""
from __future__ import annotations

from typing import Any

from torch import nn


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


def fsdp2(param_dtype: str | None = None, reduce_dtype: str | None = "float32", **kwargs: Any):
    """Lightning's ModelParallelStrategy as FSDP2 over every rank (data parallel size = world
    size, no tensor parallelism); the model's `configure_model` calls `strategy.shard(model)`.
    param_dtype: the dtype blocks compute in (None: their own; bfloat16 on GPUs), reduce_dtype:
    the gradients' all-reduce dtype. Checkpoints are gathered into one file on rank zero."""
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

    kwargs.setdefault("save_distributed_checkpoint", False)
    return FSDP2Strategy(**kwargs)
