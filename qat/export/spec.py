"""The `export` group of train.yaml: whether and how a run writes its deployable checkpoint."""
from __future__ import annotations

from dataclasses import dataclass

DTYPES = ("bfloat16", "float16", "float32")
EVAL_BACKENDS = ("reference", "auto")


@dataclass(frozen=True)
class ExportSpec:
    """compressed-tensors pack-quantized into <run dir>/export/ (`export=true` on the command line
    is short for export.enabled=true)."""

    enabled: bool = True  # the deployable checkpoint is the point of a run
    target: str | None = None  # a serving target that must run the export (qat.export.serving)
    dtype: str = "bfloat16"  # everything not quantized (embeddings, norms)
    evaluate: bool = True  # the export's perplexity (metrics.json: export_ppl)
    eval_backend: str = "reference"  # reference: unpack + float32 matmul | auto: fused kernels
    max_shard_size: int | str = "5GB"  # weights files of at most this size (and an index)

    @property
    def max_shard_bytes(self) -> int:
        from qat.format.shards import parse_size

        return parse_size(self.max_shard_size)

    def __post_init__(self) -> None:
        from qat.export.serving import check_target

        if self.dtype not in DTYPES:
            raise ValueError(f"export.dtype={self.dtype!r} is not one of {DTYPES}")
        if self.eval_backend not in EVAL_BACKENDS:
            raise ValueError(f"export.eval_backend={self.eval_backend!r} is not one of "
                             f"{EVAL_BACKENDS}")
        check_target(self.target)
        self.max_shard_bytes  # noqa: B018 - raises naming the field when it is not a size
        for name in ("enabled", "evaluate"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"export.{name}={getattr(self, name)!r} must be true or false")
