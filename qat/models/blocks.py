"""What every stage that works block by block needs: the inputs each decoder block is called with,
a block's hidden-state output, and the float model behind the fake quantizers.

The stages (PTQ calibration, the block stage, AWQ's fold check, sensitivity) share these; they live
here, below quantization, so no stage imports another for them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from qat.models.structure import decoder_blocks


class Switchable(nn.Module):
    """A part of a model that approximates what the float model computes and can be switched off
    (`enabled = False`) to give the float model back: the fake quantizers (qat.quant) are."""

    enabled: bool = True


@contextmanager
def fake_quant_disabled(module: nn.Module) -> Iterator[nn.Module]:
    """Run `module` in float (weights and activations), restoring each quantizer's flag on exit."""
    saved = [(m, m.enabled) for m in module.modules() if isinstance(m, Switchable)]
    for m, _ in saved:
        m.enabled = False
    try:
        yield module
    finally:
        for m, enabled in saved:
            m.enabled = enabled


def device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def hidden_of(output) -> torch.Tensor:
    """A block's hidden states, whether it returns them alone or first in a tuple."""
    return output[0] if isinstance(output, (tuple, list)) else output


class _Stop(Exception):
    """Raised after the last block's inputs are recorded: nothing after it needs to run."""


@dataclass
class BlockInputs:
    """What the decoder blocks receive for one mini-batch: the first block's hidden states, and
    per block the other positional args and kwargs (position embeddings, attention mask ...).

    Blocks of one model can differ here (Gemma: sliding-window and global layers get their own
    mask and rotary tables), so each block is later run with its own."""

    hidden: torch.Tensor
    calls: list[tuple[tuple, dict]]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                         batch_size: int) -> list[BlockInputs]:
    """Run the model on `ids` in mini-batches with every block replaced by a recorder that passes
    its input through (no block computes, nothing after the last block runs), and keep what each
    block was called with: the cost is the embedding lookups."""
    captured: list[BlockInputs] = []

    def recorder(index: int):
        def forward(*args, **kwargs):
            kwargs = dict(kwargs)
            hidden = args[0] if args else kwargs.pop("hidden_states")
            if index == 0:
                captured.append(BlockInputs(hidden, []))
            captured[-1].calls.append((tuple(args[1:]), kwargs))
            if index == len(blocks) - 1:
                raise _Stop
            return hidden  # only block 0's input is kept: what later blocks get does not matter
        return forward

    with forwards_replaced(blocks, recorder):
        for batch in ids.split(batch_size):
            try:
                model(input_ids=batch.to(device_of(model)), use_cache=False)
            except _Stop:
                pass
    return captured


@contextmanager
def forwards_replaced(blocks: nn.ModuleList, forward_of: Callable[[int], Callable]
                      ) -> Iterator[None]:
    """Each block's forward is `forward_of(index)` in the body; its own one (the class's, or an
    onloaded block's instance-level one) again after."""
    own = [block.__dict__.get("forward") for block in blocks]
    for index, block in enumerate(blocks):
        block.forward = forward_of(index)
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@torch.no_grad()
def forward_block_by_block(model: nn.Module, ids: torch.Tensor, batch_size: int,
                           each: Callable[[torch.Tensor, torch.Tensor], None]) -> None:
    """`each(batch, model(input_ids=batch).logits)` for every mini-batch of `ids`, computed one
    decoder block at a time over all mini-batches: an onloaded model reads each block once, not
    once per batch. The numbers are the model's own (each block gets the arguments the model
    gives it; the final norm and head run as in its forward), at the cost of every batch's
    hidden states held at once."""
    from qat.models.onload import held

    _, blocks = decoder_blocks(model)
    captured = capture_block_inputs(model, blocks, ids, batch_size)
    states = [c.hidden for c in captured]
    wrapped = False  # whether a block returns (hidden, ...) rather than hidden
    for index, block in enumerate(blocks):
        with held(block):
            outs = [block(h, *c.calls[index][0], **c.calls[index][1])
                    for h, c in zip(states, captured)]
        wrapped = isinstance(outs[0], (tuple, list))
        states = [hidden_of(out) for out in outs]
    final = None

    def replayed(index: int):  # the blocks pass their input on; the last gives `final`
        def forward(*args, **kwargs):
            hidden = final if index == len(blocks) - 1 else \
                (args[0] if args else kwargs["hidden_states"])
            return (hidden,) if wrapped else hidden
        return forward

    with forwards_replaced(blocks, replayed):
        for batch, final in zip(ids.split(batch_size), states):
            each(batch, model(input_ids=batch.to(device_of(model)), use_cache=False).logits)
