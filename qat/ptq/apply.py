"""`quantize_model`: post-training quantization of a prepared model, one method per registry entry.

Every method leaves its result where training and export already look: the weight in
`module.weight` and, except SmoothQuant (which only reshapes the float model), the grid in the
fake quantizer's static qparams. The fake-quantized forward is then the PTQ model, and
`qat.export` writes it unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn

from qat.ptq.awq import block_qparams, scale_block
from qat.ptq.calibrate import collect_input_stats, run_blocks
from qat.ptq.gptq import gptq_quantize
from qat.ptq.rtn import rtn_qparams
from qat.ptq.smoothquant import smooth_block
from qat.ptq.spec import PTQSpec
from qat.quant.modules import FakeQuantLinear


@dataclass
class PTQReport:
    """What calibration did, per layer; `to_dict` is JSON-serialisable."""

    method: str
    samples: int = 0
    tokens: int = 0
    seconds: float = 0.0
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)  # layer -> method's numbers
    groups: dict[str, float] = field(default_factory=dict)  # awq alpha / smoothquant max scale

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "samples": self.samples, "tokens": self.tokens,
                "seconds": round(self.seconds, 3), "layers": self.layers, "groups": self.groups}

    def __str__(self) -> str:
        data = f"{self.samples} x {self.tokens // self.samples} calibration tokens" \
            if self.samples else "no calibration data"
        return f"ptq {self.method}: {len(self.layers)} layers set, {data}, {self.seconds:.1f}s"


def quantized_linears(module: nn.Module, prefix: str = "") -> dict[str, FakeQuantLinear]:
    """FakeQuantLinear modules inside `module`, by full dotted name."""
    return {(f"{prefix}.{n}" if prefix else n): m for n, m in module.named_modules()
            if isinstance(m, FakeQuantLinear)}


@torch.no_grad()
def write_layer(module: FakeQuantLinear, weight: torch.Tensor, scale: torch.Tensor,
                zero_point: torch.Tensor) -> None:
    """Store a PTQ result: the weight in the shared Parameter, the grid as static qparams."""
    module.weight.copy_(weight.to(module.weight.dtype))
    module.weight_fake_quant.set_qparams(scale.to(module.weight.device),
                                         zero_point.to(module.weight.device))


def rtn_layers(module: nn.Module, report: PTQReport, prefix: str = "",
               only: list[str] | None = None) -> None:
    """Min-max grid frozen as static qparams on every quantized Linear in `module` (a model or
    one block, named under `prefix`; `only`: these of them); needs no calibration data."""
    for name, layer in quantized_linears(module, prefix).items():
        if only is not None and name not in only:
            continue
        scale, zero = rtn_qparams(layer.weight, layer.weight_fake_quant.spec)
        write_layer(layer, layer.weight, scale, zero)
        report.layers[name] = {**report.layers.get(name, {}),
                               "bits": layer.weight_fake_quant.spec.bits}


def hessian_parts(layers: dict[str, nn.Module], budget: float) -> list[set[str]]:
    """The block's quantized Linears in parts whose Hessians (float32, in_features^2, counted
    per Linear: an upper bound where inputs are shared) fit `budget` bytes, a module's
    Linears (one expert, the attention) never split: a dense block is one part, an MoE block
    with more experts than fit is several."""
    by_parent: dict[str, list[str]] = {}
    for name in layers:
        by_parent.setdefault(name.rpartition(".")[0], []).append(name)
    parts, current, used = [], set(), 0.0
    for names in by_parent.values():
        size = sum(4 * layers[n].in_features ** 2 for n in names)
        if current and used + size > budget:
            parts.append(current)
            current, used = set(), 0.0
        current |= set(names)
        used += size
    return parts + [current] if current else parts


def uncalibrated(name: str, stats: dict, report: PTQReport) -> bool:
    """Whether no calibration token reached layer `name` (an MoE expert the router never
    chose): it then falls back to round-to-nearest, recorded in the report and said aloud,
    rather than a crash or a silent skip."""
    if name in stats and stats[name].rows:
        return False
    report.layers[name] = {"tokens": 0, "fallback": "rtn"}
    print(f"warning: ptq {report.method}: no calibration token reached {name}; it gets "
          "round-to-nearest instead (more calibration samples reach more experts)")
    return True


def _rtn(model: nn.Module, ids: torch.Tensor, spec: PTQSpec, report: PTQReport,
         device: torch.device | None, hooks: dict[str, Any]) -> None:
    if hooks:
        raise ValueError("ptq.method='rtn' needs no pass over the blocks: use rtn_layers per block")
    rtn_layers(model, report)


def _gptq(model: nn.Module, ids: torch.Tensor, spec: PTQSpec, report: PTQReport,
          device: torch.device | None, hooks: dict[str, Any]) -> None:
    def on_block(prefix: str, block: nn.Module, forward: Callable[[], None]) -> None:
        layers = quantized_linears(block, prefix)
        results, fallback = {}, []
        for part in hessian_parts(layers, spec.hessian_gib * 2 ** 30):
            stats = collect_input_stats(block, forward, prefix=prefix, hessian=True, only=part)
            for name in part:
                if uncalibrated(name, stats, report):
                    fallback.append(name)
                    continue
                module = layers[name]
                results[name] = gptq_quantize(module.weight, stats[name].hessian,
                                              module.weight_fake_quant.spec, damp=spec.damp,
                                              block_size=spec.block_size,
                                              act_order=spec.act_order)
                report.layers[name] = {"bits": module.weight_fake_quant.spec.bits,
                                       "error": results[name].error,
                                       "damp": results[name].damp, "tokens": stats[name].rows}
            del stats
        for name, result in results.items():  # after every pass: each read the block unchanged
            write_layer(layers[name], result.weight, result.scale, result.zero_point)
        rtn_layers(block, report, prefix, only=fallback)

    run_blocks(model, ids, on_block, batch_size=spec.batch_size, progress=spec.progress,
               device=device, **hooks)


def _awq(model: nn.Module, ids: torch.Tensor, spec: PTQSpec, report: PTQReport,
         device: torch.device | None, hooks: dict[str, Any]) -> None:
    def on_block(prefix: str, block: nn.Module, forward: Callable[[], None]) -> None:
        stats = collect_input_stats(block, forward, prefix=prefix, hessian=True)
        layers = quantized_linears(block, prefix)
        specs = {n: m.weight_fake_quant.spec for n, m in layers.items()}
        report.groups.update(scale_block(block, prefix, stats, specs, spec.awq_grid))
        qparams = block_qparams(layers, stats, specs, spec.awq_clip, spec.awq_clip_grid,
                                spec.awq_max_shrink)
        for name, (scale, zero) in qparams.items():
            write_layer(layers[name], layers[name].weight, scale, zero)
            if not uncalibrated(name, stats, report):  # else its grid is the min/max one
                report.layers[name] = {"tokens": stats[name].rows}
            report.layers[name]["bits"] = specs[name].bits

    run_blocks(model, ids, on_block, batch_size=spec.batch_size, progress=spec.progress,
               device=device, **hooks)


def _smoothquant(model: nn.Module, ids: torch.Tensor, spec: PTQSpec, report: PTQReport,
                 device: torch.device | None, hooks: dict[str, Any]) -> None:
    def on_block(prefix: str, block: nn.Module, forward: Callable[[], None]) -> None:
        stats = collect_input_stats(block, forward, prefix=prefix, hessian=False)
        report.groups.update(smooth_block(block, prefix, stats, spec.smoothquant_alpha))

    run_blocks(model, ids, on_block, batch_size=spec.batch_size, progress=spec.progress,
               device=device, **hooks)


METHODS: dict[str, Callable[[nn.Module, torch.Tensor, PTQSpec, PTQReport, Any, dict], None]] = {
    "rtn": _rtn, "gptq": _gptq, "awq": _awq, "smoothquant": _smoothquant,
}


def quantize_model(model: nn.Module, method: str | PTQSpec, calibration_ids: torch.Tensor | None,
                   *, device: torch.device | None = None,
                   before_block: Callable[[int, nn.Module], None] | None = None,
                   after_block: Callable[[int, nn.Module], None] | None = None,
                   **options: Any) -> PTQReport:
    """Post-training-quantize a model already `prepare`d with FakeQuantLinear layers, in place.

    Args:
        model: Hugging Face decoder-only causal LM (Llama-style blocks for awq/smoothquant).
        method: "rtn" | "gptq" | "awq" | "smoothquant", or a full PTQSpec.
        calibration_ids: (N, T) token ids without padding; the first `calibration_samples` rows
            are used. May be None for rtn.
        device: where each block calibrates (moved there for its turn); default: the model's.
        before_block / after_block: as `run_blocks` takes them (a streamed run's float weights
            read in, its result kept and its codes held after); not for rtn.
        **options: PTQSpec fields overriding the spec (e.g. batch_size=4, act_order=True).
    Returns:
        PTQReport. Afterwards each quantized layer's fake-quantized forward is the PTQ result.
    """
    spec = replace(method, **options) if isinstance(method, PTQSpec) \
        else PTQSpec(method=method, **options)
    hooks = {k: v for k, v in (("before_block", before_block), ("after_block", after_block))
             if v is not None}
    if not quantized_linears(model):
        raise ValueError("ptq: the model has no FakeQuantLinear; run qat.quant.prepare first")
    report = PTQReport(spec.method)
    if spec.method != "rtn":
        if calibration_ids is None or calibration_ids.ndim != 2 or calibration_ids.shape[0] == 0:
            raise ValueError(f"ptq.method={spec.method!r} needs calibration token ids shaped "
                             "(samples, seq_len)")
        calibration_ids = calibration_ids[: spec.calibration_samples]
        report.samples, report.tokens = calibration_ids.shape[0], calibration_ids.numel()
    was_training = model.training
    start = time.perf_counter()
    try:
        METHODS[spec.method](model.eval(), calibration_ids, spec, report, device, hooks)
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - start
    return report
