"""Sequential, block-by-block calibration of a Llama-style decoder, and input statistics per Linear.

Only one decoder block's activations and the hidden states between blocks live in memory: the
inputs of the first block are captured with a hook that stops the model's forward, then every block
is calibrated (statistics -> weight update) and re-run to produce the next block's inputs, so later
blocks see the already-quantized earlier ones, as in GPTQ.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from qat.models.blocks import capture_block_inputs, device_of, fake_quant_disabled, hidden_of
from qat.models.placement import block_on, to_device
from qat.models.structure import decoder_blocks


@torch.no_grad()
def run_blocks(model: nn.Module, ids: torch.Tensor,
               on_block: Callable[[str, nn.Module, Callable[[], None]], None], *,
               batch_size: int = 8, progress: bool = False,
               device: torch.device | None = None,
               before_block: Callable[[int, nn.Module], None] | None = None,
               after_block: Callable[[int, nn.Module], None] | None = None) -> None:
    """Calibrate the decoder block by block.

    Args:
        model: a Hugging Face causal LM (eval mode is set here).
        ids: (N, T) token ids without padding.
        on_block: called as on_block(prefix, block, forward) for each block in order; `forward()`
            runs the block on every calibration mini-batch (outputs discarded) so the callback can
            collect statistics with hooks, then it updates the block's weights in place.
        batch_size: sequences per forward pass.
        progress: show a tqdm bar over blocks.
        device: where each block computes (moved there for its turn, back after) with the
            hidden states between blocks; default: where the model is.
        before_block / after_block: called as f(index, block) before the block is moved in (a
            streamed run reads its float weights there) and after its next inputs are computed
            and it is moved back (a streamed run keeps its result and holds its codes).
    """
    from tqdm.auto import tqdm

    model.eval()
    prefix, blocks = decoder_blocks(model)
    device = device if device is not None else device_of(model)
    captured = capture_block_inputs(model, blocks, ids, batch_size)
    states = [c.hidden.to(device) for c in captured]
    for index, block in enumerate(tqdm(blocks, desc="ptq", disable=not progress)):
        calls = [to_device(c.calls[index], device) for c in captured]

        def forward(block=block, states=states, calls=calls) -> None:
            for hidden, (args, kwargs) in zip(states, calls):
                block(hidden, *args, **kwargs)

        if before_block is not None:
            before_block(index, block)
        with block_on(block, device):
            on_block(f"{prefix}.{index}", block, forward)
            states = [hidden_of(block(hidden, *args, **kwargs))
                      for hidden, (args, kwargs) in zip(states, calls)]
        if after_block is not None:
            after_block(index, block)


class InputStats:
    """Running statistics of one Linear's inputs, over all calibration tokens.

    gram = X^T X / n feeds GPTQ (H = 2 gram) and AWQ's output-error estimates; abs_mean and abs_max
    per input channel feed AWQ and SmoothQuant; outlier_rows counts tokens with |x| > threshold.
    """

    def __init__(self, features: int, device: torch.device, hessian: bool,
                 threshold: float | None) -> None:
        self.rows = 0
        self.threshold = threshold
        self.xtx = torch.zeros(features, features, device=device) if hessian else None
        self.abs_sum = torch.zeros(features, device=device)
        self.abs_max = torch.zeros(features, device=device)
        self.outlier_rows = torch.zeros(features, device=device) if threshold is not None else None

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # (tokens, features)
        a = x.abs()
        self.rows += x.shape[0]
        self.abs_sum += a.sum(0)
        self.abs_max = torch.maximum(self.abs_max, a.amax(0))
        if self.xtx is not None:
            self.xtx += x.T @ x
        if self.outlier_rows is not None:
            self.outlier_rows += (a > self.threshold).sum(0)

    @property
    def gram(self) -> torch.Tensor:
        return self.xtx / max(self.rows, 1)

    @property
    def hessian(self) -> torch.Tensor:
        """GPTQ's H = 2 X^T X / n."""
        return 2 * self.gram

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.rows, 1)

    def rescale(self, s: torch.Tensor) -> None:
        """The inputs became x / s (a scale folded into the layer before): follow them."""
        self.abs_sum /= s
        self.abs_max /= s
        if self.xtx is not None:
            self.xtx /= s[:, None] * s[None, :]


@torch.no_grad()
def collect_input_stats(module: nn.Module, forward: Callable[[], None], *, prefix: str = "",
                        hessian: bool = True, threshold: float | None = None,
                        only: set[str] | None = None) -> dict[str, InputStats]:
    """Input statistics of every nn.Linear inside `module` (`only`: of these full names),
    gathered while `forward()` runs.

    Fake quantization inside `module` is off meanwhile: all its Linears are calibrated against the
    float block, as in GPTQ. Linears fed the very same tensor (q/k/v, gate/up) share one object,
    so a Hessian is accumulated once and a scale folded into their input is applied once.
    """
    stats: dict[str, InputStats] = {}
    last: dict[str, object] = {}  # strong ref to the latest input tensor and its stats

    def make_hook(name: str):
        def hook(mod, args):
            x = args[0]
            if last.get("x") is x:
                stats[name] = last["stats"]
                return
            if name not in stats:
                stats[name] = InputStats(x.shape[-1], x.device, hessian, threshold)
            stats[name].update(x)
            last.update(x=x, stats=stats[name])
        return hook

    names = {n: f"{prefix}.{n}" if prefix else n for n, m in module.named_modules()
             if isinstance(m, nn.Linear)}
    handles = [module.get_submodule(n).register_forward_pre_hook(make_hook(full))
               for n, full in names.items() if only is None or full in only]
    try:
        with fake_quant_disabled(module):
            forward()
    finally:
        for handle in handles:
            handle.remove()
        last.clear()
    return stats


def batched_forward(model: nn.Module, ids: torch.Tensor, batch_size: int) -> Callable[[], None]:
    """A `forward()` for `collect_input_stats` that runs the whole model over `ids`."""
    def forward() -> None:
        for batch in ids.split(batch_size):
            model(input_ids=batch.to(device_of(model)), use_cache=False)
    return forward


@torch.no_grad()
def kl_to_float(model: nn.Module, ids: torch.Tensor, batch_size: int = 8,
                reference: nn.Module | None = None) -> float:
    """Mean per-token KL(reference || model) on `ids`, the model fake-quantized.

    Without `reference` the float model is `model` itself with every fake quantizer off; that is
    only the original float model while `model.weight` holds the float weights, so after GPTQ
    (which writes its weights there) pass a float copy. Unlike cross-entropy on the data it is zero
    only for an exact model and grows with the quantization damage.
    """
    total, count = 0.0, 0
    device = device_of(model)
    for batch in ids.split(batch_size):
        batch = batch.to(device)
        with fake_quant_disabled(reference if reference is not None else model) as ref_model:
            ref = torch.log_softmax(ref_model(input_ids=batch, use_cache=False).logits.float(), -1)
        out = torch.log_softmax(model(input_ids=batch, use_cache=False).logits.float(), -1)
        total += (ref.exp() * (ref - out)).sum().item()
        count += batch.numel()
    return total / count
