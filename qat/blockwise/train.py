"""The block stage: decoder blocks trained one at a time against the float model's block outputs.

    fp_in, q_in = embeddings(ids)                        # (N, T, H) each
    for block k:
        target = float_block_k(fp_in)                    # what the float model computes there
        train block_k (weights + grid, fake-quantized) so that block_k(q_in) ~ target  (MSE)
        q_in, fp_in = block_k(q_in), target              # the next block sees the quantized chain

Only one block trains at a time; memory holds the block, its optimizer and three (N, T, H)
activation tensors. The grid trains as `FakeQuantWeight.learn_grid` parameters and is frozen back to
static qparams after the block, so the exporter writes exactly what was trained.
"""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from qat.blockwise.spec import BlockwiseSpec
from qat.distill.losses import ForwardKL
from qat.models.experts import forced_routing, recorded_routing
from qat.models.blocks import capture_block_inputs, device_of, fake_quant_disabled, hidden_of
from qat.io import release_memory
from qat.models.onload import held
from qat.models.placement import block_on, native_bf16, residents_on
from qat.models.structure import decoder_blocks
from qat.quant.modules import FakeQuantLinear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class BlockResult:
    index: int
    name: str
    loss_before: float  # mean squared error to the float block output, before training
    loss_after: float
    seconds: float
    steps: int


@dataclass
class BlockwiseReport:
    """What the block stage did, per block; `to_dict` is JSON-serialisable."""

    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    resumed_blocks: int = 0  # blocks taken from an earlier, interrupted run
    blocks: list[BlockResult] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"samples": self.samples, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "resumed_blocks": self.resumed_blocks,
                "blocks": [asdict(b) for b in self.blocks]}

    def summary(self) -> dict[str, Any]:
        """The metrics.json section: totals and the mean loss before and after."""
        n = max(len(self.blocks), 1)
        return {"samples": self.samples, "tokens": self.tokens, "seconds": round(self.seconds, 1),
                "blocks": len(self.blocks), "resumed_blocks": self.resumed_blocks,
                "mean_loss_before": sum(b.loss_before for b in self.blocks) / n,
                "mean_loss_after": sum(b.loss_after for b in self.blocks) / n}

    def __str__(self) -> str:
        s = self.summary()
        return (f"blockwise: {s['blocks']} blocks on {self.samples} x "
                f"{self.tokens // max(self.samples, 1)} tokens, mean block loss "
                f"{s['mean_loss_before']:.4g} -> {s['mean_loss_after']:.4g}, {self.seconds:.0f} s")


class _Inputs:
    """The tensors one block call needs besides the hidden states (rotary tables, masks), as the
    model computed them for a mini-batch of `batch_size` sequences."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, ids: torch.Tensor,
                 batch_size: int, dtype: torch.dtype) -> None:
        captured = capture_block_inputs(model, blocks, ids, batch_size)
        self.hidden = torch.cat([c.hidden.to(dtype) for c in captured])  # (N, T, H)
        # every mini-batch has batch_size sequences: the first one's call fits them all
        self.calls = {id(block): call for block, call in zip(blocks, captured[0].calls)}
        self.batch_size = batch_size

    def call(self, block: nn.Module, x: torch.Tensor, route: dict | None = None) -> torch.Tensor:
        """block(x); `route`: the routing its MoE layers take instead of their routers'."""
        args, kwargs = self.calls[id(block)]
        # the block's own dtype in, float32 out: losses are computed in float32 whatever it is
        dtype = next(block.parameters()).dtype
        with forced_routing(block, route):
            return hidden_of(block(x.to(dtype), *args, **kwargs)).float()

    @torch.no_grad()
    def run(self, block: nn.Module, x: torch.Tensor, target: torch.Tensor | None = None,
            keep: bool = True, routing: "_Routing | None" = None
            ) -> tuple[torch.Tensor | None, float | None]:
        """block(x) over all N sequences in mini-batches, kept in x's dtype (None with
        keep=False), and its mean squared error to `target` (None without one)."""
        outs, total = [], 0.0
        for i, xb in enumerate(x.split(self.batch_size)):
            route = None if routing is None else routing.of(
                torch.arange(i * self.batch_size, i * self.batch_size + xb.shape[0]))
            out = self.call(block, xb, route)
            if target is not None:
                tb = target[i * self.batch_size:(i + 1) * self.batch_size].float()
                total += F.mse_loss(out, tb, reduction="sum").item()
            if keep:
                outs.append(out.to(x.dtype))
        return (torch.cat(outs) if keep else None,
                total / target.numel() if target is not None else None)

    def loss(self, block: nn.Module, x: torch.Tensor, target: torch.Tensor,
             routing: "_Routing | None" = None) -> float:
        """Mean squared error of block(x) to target over all N sequences."""
        return self.run(block, x, target, keep=False, routing=routing)[1]


class _Routing:
    """The float block's routing of every sample (blockwise.routing=float), replayed on the
    quantized block: each MoE layer's (top_k_index, top_k_weights) as (N, T, k) tensors."""

    def __init__(self, recorded: dict[str, list], samples: int) -> None:
        self.layers = {name: tuple(torch.cat(part).reshape(samples, -1, part[0].shape[-1])
                                   for part in zip(*calls))
                       for name, calls in recorded.items()}

    def of(self, rows: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The routing of samples `rows`, flattened to tokens as the MoE layer sees them."""
        return {name: tuple(t[rows].reshape(-1, t.shape[-1]) for t in pair)
                for name, pair in self.layers.items()}


FINAL_NORMS = ("norm", "ln_f", "final_layer_norm", "final_layernorm", "norm_f")


def logit_lens(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """What the model applies after its last block, as a function of hidden states: the final norm
    (and OPT's project_out), the head and any logit soft-capping. Applied to an earlier block's
    output it reads that block's next-token guess (the logit lens), which the KD term compares."""
    prefix, _ = decoder_blocks(model)
    owner = model.get_submodule(prefix.rpartition(".")[0]) if "." in prefix else model
    norm = next((getattr(owner, n) for n in FINAL_NORMS if isinstance(getattr(owner, n, None),
                                                                     nn.Module)), None)
    if norm is None:
        raise ValueError(f"blockwise.kd_weight > 0: {type(model).__name__} has no final norm "
                         f"named one of {list(FINAL_NORMS)} beside its blocks ({prefix}); set "
                         "blockwise.kd_weight=0")
    project = getattr(owner, "project_out", None)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def lens(hidden: torch.Tensor) -> torch.Tensor:
        h = norm(hidden)
        if project is not None:
            h = project(h)
        logits = head(h)
        return torch.tanh(logits / cap) * cap if cap else logits
    return lens


def _kd_term(lens, out: torch.Tensor, goal: torch.Tensor, spec: BlockwiseSpec,
             divergence: nn.Module, generator: torch.Generator) -> torch.Tensor:
    """KL(float || quantized) of the logit-lens distributions at kd_tokens sampled positions."""
    out, goal = out.reshape(-1, out.shape[-1]), goal.reshape(-1, goal.shape[-1])
    pos = torch.randperm(out.shape[0], generator=generator)[:spec.kd_tokens]
    with torch.no_grad():
        teacher = lens(goal[pos])
    return divergence(lens(out[pos]), teacher)


def _grid_and_weights(block: nn.Module, spec: BlockwiseSpec) -> list[dict]:
    """AdamW parameter groups: the block's weights, its scales and its zero points."""
    scales, zero_points = [], []
    for module in block.modules():
        if isinstance(module, FakeQuantLinear):
            fq = module.weight_fake_quant
            params = fq.learn_grid(module.weight, zero_point=spec.zero_point_lr > 0)
            scales.append(params[0])
            zero_points.extend(params[1:])
    weights = [p for n, p in block.named_parameters()
               if "weight_fake_quant" not in n and p.is_floating_point()]
    groups = [{"params": weights, "lr": spec.lr if spec.train_weights else 0.0,
               "weight_decay": spec.weight_decay},
              {"params": scales, "lr": spec.scale_lr, "weight_decay": 0.0},
              {"params": zero_points, "lr": spec.zero_point_lr, "weight_decay": 0.0}]
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(group["lr"] > 0)
    return [g for g in groups if g["params"] and g["lr"] > 0]


def cosine(step: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate multiplier: cosine from 1 down to `floor` over `total` steps."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def train_block(block: nn.Module, inputs: _Inputs, q_in: torch.Tensor, target: torch.Tensor,
                fp_in: torch.Tensor | None, spec: BlockwiseSpec, generator: torch.Generator,
                lens: Callable[[torch.Tensor], torch.Tensor] | None = None,
                routing: _Routing | None = None) -> int:
    """Train one block in place; its grid ends frozen as static qparams. Returns the steps taken.

    Each step: a mini-batch of sequences (one seeded shuffle per epoch), loss = MSE(block(q_in),
    target) (+ MSE(block(fp_in), target) with inputs=both, + kd_weight x the logit-lens KL with
    a `lens`), AdamW on weights, scales, zero points.
    """
    divergence = ForwardKL(spec.kd_temperature)
    trainable = {id(p): p.requires_grad for p in block.parameters()}
    groups = _grid_and_weights(block, spec)
    steps = 0
    try:
        if groups:
            optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.999))
            schedule = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda s: cosine(s, spec.steps_per_block))
            n, bs = q_in.shape[0], spec.batch_size
            device = next(block.parameters()).device
            compute = spec.compute_dtype if spec.compute_dtype != "auto" else (
                "bfloat16" if native_bf16(device) else "float32")
            autocast = torch.autocast(device.type, dtype=DTYPES[compute],
                                      enabled=compute != "float32")
            for _ in range(spec.epochs):
                order = torch.randperm(n, generator=generator)
                for start in range(0, n - bs + 1, bs):
                    idx = order[start:start + bs]
                    goal = target[idx].float()
                    route = routing.of(idx) if routing is not None else None
                    with autocast:
                        out = inputs.call(block, q_in[idx], route)
                        loss = F.mse_loss(out, goal)
                        if lens is not None:
                            loss = loss + spec.kd_weight * _kd_term(lens, out, goal, spec,
                                                                    divergence, generator)
                        if fp_in is not None:
                            loss = loss + F.mse_loss(inputs.call(block, fp_in[idx], route),
                                                     goal)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"blockwise: loss is {loss.item()} at step "
                                                 f"{steps}; lower blockwise.lr / scale_lr")
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    schedule.step()
                    steps += 1
    finally:
        for module in block.modules():
            if isinstance(module, FakeQuantLinear):
                module.weight_fake_quant.freeze_grid()
        for p in block.parameters():
            p.requires_grad_(trainable.get(id(p), True))
    return steps


def train_blocks(model: nn.Module, float_model: nn.Module, ids: torch.Tensor,
                 spec: BlockwiseSpec, *, seed: int = 0, store=None,
                 on_block: Callable[[BlockResult], None] | None = None,
                 before_block: Callable[[int, nn.Module], None] | None = None,
                 after_block: Callable[[int, nn.Module], None] | None = None,
                 device: torch.device | None = None) -> BlockwiseReport:
    """Block-wise QAT of a prepared (and optionally PTQ-initialised) model, in place.

    Args:
        model: the fake-quantized causal LM; its blocks are trained in order.
        float_model: the float model with the same architecture (the distillation teacher or a
            copy taken before quantization); only read.
        ids: (N, T) calibration token ids; N is cut to a multiple of spec.batch_size.
        spec: sizes, learning rates and loss.
        seed: the per-block shuffles are a pure function of (seed, block index).
        store: a `BlockStore`: blocks it already holds are loaded instead of trained (resume),
            and each newly trained block is saved to it.
        on_block: called with each block's result (e.g. a progress bar).
        before_block, after_block: called with (index, block) around a block's training (not for
            a resumed block): give it its float weights back, keep only its codes after.
        device: where the blocks train (each moved there for its turn, back after) and the
            cached inputs and targets live; default: where the model is.
    Returns:
        BlockwiseReport; afterwards every quantized Linear holds trained weights and a static grid.
    """
    n = ids.shape[0] // spec.batch_size * spec.batch_size
    if n == 0:
        raise ValueError(f"blockwise.samples: {ids.shape[0]} calibration sequence(s) are fewer "
                         f"than blockwise.batch_size={spec.batch_size}")
    ids = ids[:n]
    was_training = (model.training, float_model.training)
    model.eval(), float_model.eval()
    prefix, blocks = decoder_blocks(model)
    _, float_blocks = decoder_blocks(float_model)
    if len(blocks) != len(float_blocks):
        raise ValueError(f"blockwise: the float model has {len(float_blocks)} decoder blocks, the "
                         f"student {len(blocks)}; the block stage needs the same architecture")
    device = device if device is not None else device_of(model)
    try:
        with residents_on(model, device), residents_on(float_model, device):
            report = _train_blocks(model, float_model, blocks, float_blocks, prefix, ids, spec,
                                   seed, store, on_block, before_block, after_block, device)
    finally:
        model.train(was_training[0]), float_model.train(was_training[1])
    return report


def _train_blocks(model, float_model, blocks, float_blocks, prefix, ids, spec, seed, store,
                  on_block, before_block, after_block, device) -> BlockwiseReport:
    """train_blocks' loop, with the models' resident parts on `device`."""
    from tqdm.auto import tqdm

    n = ids.shape[0]
    dtype = DTYPES[spec.cache_dtype]
    report = BlockwiseReport(samples=n, tokens=ids.numel())
    start = time.perf_counter()
    quantized = _Inputs(model, blocks, ids, spec.batch_size, dtype)
    q_in = quantized.hidden
    with fake_quant_disabled(float_model):
        fp = _Inputs(float_model, float_blocks, ids, spec.batch_size, dtype)
    fp_in = fp.hidden
    lens = logit_lens(float_model) if spec.kd_weight > 0 else None
    done = store.completed() if store is not None else []
    if store is not None:
        store.update_info({"samples": n, "tokens": ids.numel()})
    bar = tqdm(blocks, desc="blockwise", disable=not spec.progress)
    try:
        for index, block in enumerate(bar):
            routing = None
            with fake_quant_disabled(float_model), held(float_blocks[index]), \
                    block_on(float_blocks[index], device), \
                    (recorded_routing(float_blocks[index]) if spec.routing == "float"
                     else nullcontext({})) as recorded:
                target, _ = fp.run(float_blocks[index], fp_in)
            if recorded:  # an MoE block with routing=float: replay the float block's choices
                routing = _Routing(recorded, n)
            if index < len(done):  # trained by an earlier run: load it, go on from its output
                store.load(index, block)
                result = BlockResult(**done[index])
                report.resumed_blocks += 1
                with block_on(block, device):
                    q_out, _ = quantized.run(block, q_in, routing=routing)
            else:
                t0 = time.perf_counter()
                with block_on(block, device):
                    if before_block is not None:
                        before_block(index, block)
                    before = quantized.loss(block, q_in, target, routing)
                    with fake_quant_disabled(float_model):  # the lens is the float model's
                        steps = train_block(block, quantized, q_in, target,
                                            fp_in if spec.inputs == "both" else None, spec,
                                            torch.Generator().manual_seed(seed * 100_003 + index),
                                            lens, routing)
                    # the next block's inputs
                    q_out, after = quantized.run(block, q_in, target, routing=routing)
                    if after_block is not None:
                        after_block(index, block)
                result = BlockResult(index, f"{prefix}.{index}", before, after,
                                     round(time.perf_counter() - t0, 2), steps)
                if store is not None:
                    store.save(index, block, result)
            report.blocks.append(result)
            bar.set_postfix_str(f"loss {result.loss_before:.3g} -> {result.loss_after:.3g}")
            if on_block is not None:
                on_block(result)
            q_in, fp_in = q_out, target
            release_memory()  # the block's optimizer and temporaries, back to the kernel
    finally:
        bar.close()
    report.seconds = time.perf_counter() - start
    return report
