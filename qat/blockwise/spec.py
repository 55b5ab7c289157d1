"""BlockwiseSpec: the block stage of block-wise QAT (the Hydra group `blockwise`)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

INPUTS = ("quantized", "both")
ROUTINGS = ("own", "float")
CACHE_DTYPES = ("float32", "bfloat16", "float16")
COMPUTE_DTYPES = ("float32", "bfloat16", "auto")


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ValueError(f"blockwise.{name}={value!r} is not allowed; {allowed}")


@dataclass(frozen=True)
class BlockwiseSpec:
    """Train each decoder block, in order, to reproduce the float model's block output.

    EfficientQAT's Block-AP: the quantized block takes the outputs of the already-trained quantized
    blocks before it; its target is the float block's output on the float model's own inputs; the
    block's weights, scales and zero points train together through the straight-through estimator.
    """

    enabled: bool = False
    samples: int = 32  # calibration sequences from the training split (a multiple of batch_size)
    seq_len: int = 256  # tokens per sequence
    epochs: int = 3  # passes over the samples per block
    batch_size: int = 4  # sequences per optimizer step
    lr: float = 1e-3  # block weights (Linears, biases, norms)
    scale_lr: float = 1e-3  # quantizer scales
    zero_point_lr: float = 1e-3  # quantizer zero points (asymmetric grids), rounded in forward
    weight_decay: float = 0.0
    train_weights: bool = True  # false: only the grid (scales, zero points) trains
    inputs: str = "quantized"  # quantized: the quantized chain's inputs | both: also the float inputs
    cache_dtype: str = "float32"  # cached block inputs and targets (bfloat16 halves their memory)
    # the training steps' matmuls under torch.autocast in this dtype (bfloat16: faster where the
    # hardware has it, AVX-512 BF16 / AMX / GPUs; auto: bfloat16 there, float32 elsewhere);
    # targets, losses and reported errors stay float32
    compute_dtype: str = "float32"
    # MoE blocks: own: the quantized block routes its own inputs | float: its experts take the
    # tokens (and weights) the float block's router chose for the target (teacher-forced routing)
    routing: str = "own"
    # KD term: weight x KL(float || quantized) of the next-token distributions that the float
    # model's final norm and head read from the block outputs (the logit lens); 0 turns it off
    kd_weight: float = 0.0
    kd_tokens: int = 256  # positions per step the KD term samples (the head is vocabulary-wide)
    kd_temperature: float = 1.0
    progress: bool = True  # a progress bar over blocks with each block's loss

    def __post_init__(self) -> None:
        for name in ("samples", "seq_len", "epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                _fail(name, value, "it must be a positive integer")
        if self.samples < self.batch_size:
            _fail("samples", self.samples, f"it must be at least blockwise.batch_size="
                  f"{self.batch_size}")
        for name in ("lr", "scale_lr", "zero_point_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0 \
                    or not math.isfinite(value):
                _fail(name, value, "it must be a finite number >= 0 (0 freezes that group)")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            _fail("weight_decay", self.weight_decay, "it must be a number >= 0")
        for name in ("kd_weight", "kd_temperature"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) \
                    or not math.isfinite(value) or value < 0 or (name == "kd_temperature"
                                                                 and value == 0):
                _fail(name, value, "it must be a finite number " + (
                    ">= 0 (0 turns the KD term off)" if name == "kd_weight" else "> 0"))
        if not isinstance(self.kd_tokens, int) or isinstance(self.kd_tokens, bool) \
                or self.kd_tokens < 1:
            _fail("kd_tokens", self.kd_tokens, "it must be a positive integer")
        if self.inputs not in INPUTS:
            _fail("inputs", self.inputs, f"choose one of {list(INPUTS)}")
        if self.routing not in ROUTINGS:
            _fail("routing", self.routing, f"choose one of {list(ROUTINGS)}")
        if self.cache_dtype not in CACHE_DTYPES:
            _fail("cache_dtype", self.cache_dtype, f"choose one of {list(CACHE_DTYPES)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            _fail("compute_dtype", self.compute_dtype, f"choose one of {list(COMPUTE_DTYPES)}")
        for name in ("enabled", "train_weights", "progress"):
            if not isinstance(getattr(self, name), bool):
                _fail(name, getattr(self, name), "it must be true or false")

    @property
    def steps_per_block(self) -> int:
        return self.epochs * (self.samples // self.batch_size)
