"""Which serving stacks can run an export, and why not: computed from the scheme and the layer shapes.

A run checks this before training (`export.target=NAME` makes one target an error, not a warning) and
every export carries the result as `serving_report.json`. The rules are the facts of each target's
code and what we measured with it (shared/formats/compressed-tensors.md):
- `qat`: our loader serves every scheme and layer kind we export.
- `transformers` (+ compressed-tensors): every width (dense packing since compressed-tensors 0.20),
  symmetric grids only (it cannot load packed zero points), plain nn.Linear modules only.
- `vllm-gpu`: vLLM's compressed-tensors weight-only scheme (4 or 8 bits, zero points at 4 bits
  only) on its Marlin kernels (group -1/32/64/128, in % 128, out % 64).
- `vllm-cpu`: vLLM's CPUWNA16 kernel: symmetric 4-bit only (no CPU kernel for 8-bit weight-only),
  even group sizes, in and out % 32, and an AVX-512 build (the AVX2 build lacks the int4 op).

MoE experts (layers named `...experts.N...`) have rules of their own: vLLM serves them through its
fused-MoE compressed-tensors methods (WNA16: 4 or 8 bits, pack-quantized, symmetric, group or
channel scales; its Marlin MoE kernel wants group -1/32/64/128, hidden % 128 and intermediate %
max(64, group), else its Triton WNA16 MoE takes them, group scales only; read in vLLM's
compressed_tensors_moe.py and marlin_utils.py, not run here); transformers 5 decompresses them
while loading (its MoE weight conversion merges the per-expert tensors into its fused parameters)
into dense weights in the scales' dtype, and cannot merge them at all for families whose
checkpoints store experts fused.
"""
from __future__ import annotations

from typing import Any

TARGETS = ("qat", "transformers", "vllm-gpu", "vllm-cpu")
MARLIN_GROUP_SIZES = (None, 32, 64, 128)  # None: per-channel (-1 in vLLM's terms)
VLLM_BITS = (4, 8)
# compressed-tensors before 0.20 (vLLM's pin is 0.17) packs widths that do not divide 32 with
# padding bits in every word; this export packs densely, as 0.20 and newer read it
PADDED_BEFORE_0_20 = (3, 5, 6, 7)
REQUIRES = {
    "qat": "this project installed: qat.load_quantized(directory)",
    "transformers": "transformers and compressed-tensors >= 0.20 (dense packing of 3/5/6/7 bits)",
    "vllm-gpu": "vLLM on an NVIDIA GPU with Marlin (compute capability 8.0+)",
    "vllm-cpu": "a vLLM CPU build with AVX-512: the AVX2 build lacks the int4 op (measured, 0.32)",
}


def is_expert(layer) -> bool:
    return ".experts." in layer.name


def _group(issues: dict[str, list[str]], layer, reasons: list[str]) -> None:
    for reason in reasons:
        issues.setdefault(reason, []).append(layer.name)


def _vllm_width(spec) -> list[str]:
    if spec.bits not in VLLM_BITS:
        padded = " (and its compressed-tensors pin packs them with padding, not densely)" \
            if spec.bits in PADDED_BEFORE_0_20 else ""
        return [f"{spec.bits}-bit weights: vLLM serves 4- and 8-bit weight-only layers{padded}"]
    if spec.bits == 8 and not spec.symmetric:
        return ["8-bit weights with zero points: vLLM serves zero points at 4 bits only"]
    return []


def marlin_issues(layers) -> dict[str, list[str]]:
    """Layers vLLM's GPU kernels (Marlin) cannot serve, grouped by reason."""
    issues: dict[str, list[str]] = {}
    for layer in layers:
        spec, reasons = layer.spec, _vllm_width(layer.spec)
        if is_expert(layer):  # the fused-MoE methods (Marlin MoE, else Triton WNA16 MoE)
            if not layer.vllm_reads:
                reasons.append("MoE experts of a family whose vLLM loader reads its experts fused "
                               "(GPT-OSS: MXFP4 blocks or bf16 gate_up_proj), not per expert")
            if not spec.symmetric:
                reasons.append("MoE experts with zero points: vLLM's WNA16 MoE methods assert "
                               "symmetric weights")
            if spec.granularity == "tensor":
                reasons.append("MoE experts with per-tensor scales (vLLM: group or channel)")
            _group(issues, layer, reasons)
            continue
        if spec.granularity == "tensor" or spec.effective_group_size not in MARLIN_GROUP_SIZES:
            reasons.append(f"{spec.granularity} scales with group size {spec.group_size} "
                           "(Marlin: per-channel or group 32/64/128)")
        if layer.in_features % 128:
            reasons.append(f"in_features {layer.in_features} not divisible by 128")
        if layer.out_features % 64:
            reasons.append(f"out_features {layer.out_features} not divisible by 64")
        _group(issues, layer, reasons)
    return issues


def vllm_cpu_issues(layers) -> dict[str, list[str]]:
    """Layers vLLM's CPU kernel (CPUWNA16) cannot serve, grouped by reason."""
    issues: dict[str, list[str]] = {}
    for layer in layers:
        spec, reasons = layer.spec, []
        if is_expert(layer):
            _group(issues, layer, ["quantized MoE experts: not run on vLLM's CPU build here "
                                   "(its fused-MoE path for compressed-tensors WNA16 experts is "
                                   "unverified)"])
            continue
        if spec.bits != 4:
            reasons.append(f"{spec.bits}-bit weights: vLLM's CPU kernel serves 4-bit weight-only "
                           "layers only")
        elif not spec.symmetric:
            reasons.append("zero points: vLLM's CPU kernel serves symmetric 4-bit only")
        if spec.granularity == "tensor":
            reasons.append("per-tensor scales (vLLM: per-channel or group)")
        elif spec.granularity == "group" and spec.effective_group_size % 2:
            reasons.append(f"group size {spec.group_size} is odd (vLLM's CPU kernel: even)")
        for what, size in (("in_features", layer.in_features), ("out_features", layer.out_features)):
            if size % 32:
                reasons.append(f"{what} {size} not divisible by 32 (vLLM's CPU kernel)")
        _group(issues, layer, reasons)
    return issues


def transformers_issues(layers) -> dict[str, list[str]]:
    """Layers that transformers + compressed-tensors would not load right, grouped by reason.

    compressed-tensors gives its quantized forward to plain nn.Linear modules: a quantized GPT-2
    Conv1D is left without weights (transformers runs it on random ones), and a Linear subclass
    with its own forward (FalconLinear) fails to load. Our loader (`qat.load_quantized`) serves
    both as the Linears they are."""
    issues: dict[str, list[str]] = {}
    for layer in layers:
        if is_expert(layer) and not layer.per_expert_checkpoint:
            reason = ("MoE experts of a family whose checkpoints store them fused: transformers' "
                      "weight conversion for it only renames the fused tensors and cannot merge "
                      "per-expert packed ones")
        elif layer.kind == "Conv1D":
            reason = ("Conv1D layer (GPT-2 style): compressed-tensors quantizes nn.Linear modules "
                      "only, transformers would run these on random weights")
        elif layer.kind != "Linear":
            reason = (f"{layer.kind} (a Linear subclass with its own forward): compressed-tensors' "
                      "quantized forward does not reach it")
        elif not layer.spec.symmetric:
            reason = ("zero points (asymmetric): transformers allocates them unpacked and refuses "
                      "the packed ones compressed-tensors itself writes (measured with "
                      "transformers 5.24 + compressed-tensors 0.20.1; llm-compressor issue 1618)")
        else:
            continue
        _group(issues, layer, [reason + "; serve this export with qat.load_quantized"])
    return issues


CHECKS = {"qat": lambda layers: {}, "transformers": transformers_issues, "vllm-gpu": marlin_issues,
          "vllm-cpu": vllm_cpu_issues}


MOE_LIMITS = {  # what a target serves differently when the export has quantized experts
    "transformers": "MoE experts: transformers decompresses them while loading into dense weights "
                    "in the scales' dtype (bf16), whatever dtype it is asked for, and computes "
                    "them so: no memory saved on the experts, logits equal to qat's only with the "
                    "expert weights rounded to bf16; qat.load_quantized serves them packed",
    "vllm-gpu": "MoE experts: vLLM's Marlin MoE kernel wants group -1/32/64/128, hidden % 128 and "
                "intermediate % max(64, group); other shapes run on its Triton WNA16 MoE",
}


def serving_report(layers, float_tensors: dict[str, int] | None = None
                   ) -> dict[str, dict[str, Any]]:
    """Per target: whether it can serve these quantized layers, why not, what it needs and
    what it serves differently (`limits`, when any); `float_tensors`: the matrices inside the
    decoder blocks left in float (name -> elements: routers, excluded layers), reported beside
    the targets when there are any."""
    report: dict[str, Any] = {}
    experts = any(map(is_expert, layers))
    for target in TARGETS:
        issues = CHECKS[target](layers)
        report[target] = {"servable": not issues, "reasons": issues, "requires": REQUIRES[target]}
        if experts and target in MOE_LIMITS:
            report[target]["limits"] = [MOE_LIMITS[target]]
    if float_tensors:
        report["float_tensors"] = {"count": len(float_tensors),
                                   "elements": sum(float_tensors.values()),
                                   "tensors": float_tensors}
    return report


def describe(target: str, issues: dict[str, list[str]]) -> str:
    lines = [f"  {len(names)} layer(s): {reason}, e.g. {', '.join(names[:3])}"
             for reason, names in issues.items()]
    return f"{target} cannot serve every layer of this export:\n" + "\n".join(lines)


def check_target(target: str | None) -> None:
    if target is not None and target not in TARGETS:
        raise ValueError(f"export.target={target!r} is not a serving target; allowed: null, "
                         + ", ".join(TARGETS))


def check_serving(layers, target: str | None) -> None:
    """Before training: warn about every target that cannot serve the planned export (`layers`:
    the prepare report's); `target` must serve it, or this raises naming the layers and why."""
    check_target(target)
    for name, check in CHECKS.items():
        if not (issues := check(layers)):
            continue
        if name == target:
            raise ValueError(describe(name, issues) + f"\n(export.target={target}; choose another "
                             "scheme or target, or export.target=null to export anyway)")
        if target is None:
            print("warning: " + describe(name, issues))
