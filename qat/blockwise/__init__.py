"""Block-wise quantization-aware training (EfficientQAT's Block-AP): one decoder block at a time.

    report = train_blocks(model, float_model, ids, BlockwiseSpec(enabled=True), store=store)
"""
from qat.blockwise.spec import BlockwiseSpec
from qat.blockwise.store import BlockStore
from qat.blockwise.train import BlockResult, BlockwiseReport, train_block, train_blocks

__all__ = ["BlockResult", "BlockStore", "BlockwiseReport", "BlockwiseSpec", "train_block",
           "train_blocks"]
