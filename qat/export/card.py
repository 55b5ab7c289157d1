"""The model card (`README.md`, the Hugging Face convention) every export carries.

What a user deciding whether to serve the export needs, computed from what was written: the base
model, the scheme per layer group, how it was made, float vs quantized perplexity, bits per weight,
size, how to load it with qat, transformers and vLLM, and the serving report.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

import torch

QUANTIZED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point")
MB = 1e6


def _pattern(name: str) -> str:
    """A module name with its block indices as *: model.layers.*.mlp.up_proj."""
    return re.sub(r"\.\d+\.", ".*.", name)


def layer_groups(layers) -> list[tuple[str, str, int]]:
    """(name pattern, scheme, count), in model order."""
    counts: Counter = Counter()
    for layer in layers:
        counts[(_pattern(layer.name), layer.scheme)] += 1
    return [(pattern, scheme, n) for (pattern, scheme), n in counts.items()]


def sizes(tensors: dict[str, torch.Tensor], layers) -> dict[str, float]:
    """Stored bytes, the same weights in bf16, and bits per quantized weight (scales included)."""
    shapes = {layer.name: layer.in_features * layer.out_features for layer in layers}
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    quantized = sum(t.numel() * t.element_size() for k, t in tensors.items()
                    if k.rsplit(".", 1)[-1] in QUANTIZED_PARTS)
    other = sum(t.numel() for k, t in tensors.items() if k.rsplit(".", 1)[0] not in shapes
                or k.rsplit(".", 1)[-1] == "bias")
    weights = sum(shapes.values())
    return {"stored_bytes": stored, "bf16_bytes": 2 * (weights + other),
            "bits_per_weight": 8 * quantized / weights if weights else 0.0}


def _ppl(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "not measured"


def _quality_rows(run: dict[str, Any]) -> list[str]:
    """The distance to the float model and the cloze accuracy, where the run measured them."""
    rows = []
    if run.get("kl_mean") is not None:
        rows += [f"| KL to the float model, nats per token (mean / p99) | 0 | "
                 f"{run['kl_mean']:.4f} / {run['kl_p99']:.3f} |",
                 f"| top-1 token agreement with the float model | 100% | "
                 f"{100 * run['top1']:.1f}% |"]
    if run.get("cloze_acc") is not None:
        float_acc = run.get("fp_cloze_acc")
        rows.append(f"| cloze accuracy ({run.get('cloze_items', '?')} held-out sentences' last "
                    f"word, greedy) | {'not measured' if float_acc is None else f'{100 * float_acc:.1f}%'}"
                    f" | {100 * run['cloze_acc']:.1f}% |")
    return rows


def model_card(layers, tensors: dict[str, torch.Tensor], report: dict[str, dict[str, Any]],
               ignore: list[str], run: dict[str, Any] | None = None) -> str:
    """The card's markdown. `run`: what the run knows (base_model, recipe, command, fp_ppl, ppl)."""
    run = run or {}
    base, size = run.get("base_model"), sizes(tensors, layers)
    schemes = sorted({layer.spec.describe() for layer in layers})
    lines = ["---"]
    if base and "/" in str(base) and not str(base).startswith(("/", ".", "~")):  # a hub id
        lines.append(f"base_model: {base}")
    if base:  # as the run named it (a path, a builtin name): qat-eval's default reference
        lines.append(f"qat_base_model: {base}")
    lines += ["library_name: transformers", "tags:", "- qat", "- compressed-tensors",
              "- quantized", "---", "",
              f"# {str(base or 'model').rstrip('/').rsplit('/', 1)[-1]}, {' + '.join(schemes)}", "",
              f"Weights of `{base or 'the source model'}` quantized by qat (quantization-aware "
              "training) and packed in the compressed-tensors `pack-quantized` format: integer "
              "codes in int32 words, a bf16 scale (and an integer zero point when asymmetric) per "
              "group.", ""]
    if run.get("recipe") or run.get("command"):
        lines += [f"- recipe: `{run.get('recipe', 'none')}`"]
        if run.get("command"):
            lines += [f"- made by: `{run['command']}`"]
        lines.append("")
    lines += ["| | float | quantized |", "|---|---|---|",
              f"| perplexity ({run.get('eval', 'eval protocol of the run')}) | "
              f"{_ppl(run.get('fp_ppl'))} | {_ppl(run.get('ppl'))} |",
              *_quality_rows(run),
              f"| bits per quantized weight (scales and zero points included) | 16 | "
              f"{size['bits_per_weight']:.3f} |",
              f"| weights on disk | {size['bf16_bytes'] / MB:.1f} MB (bf16) | "
              f"{size['stored_bytes'] / MB:.1f} MB |", "",
              "## Scheme per layer group", "", "| layers | scheme | count |", "|---|---|---|"]
    lines += [f"| `{pattern}` | {scheme} | {n} |" for pattern, scheme, n in layer_groups(layers)]
    kept = sorted({_pattern(name) for name in ignore})
    lines += ["", "Not quantized (stored in the export's dtype): embeddings, norms"
              + (", " + ", ".join(f"`{k}`" for k in kept) if kept else "") + ".", "",
              "## Load it", "", "```python", "import qat  # fused dequantize-matmul kernels",
              "model = qat.load_quantized(\"DIR\")", "", "from transformers import "
              "AutoModelForCausalLM  # needs compressed-tensors >= 0.20",
              "model = AutoModelForCausalLM.from_pretrained(\"DIR\")", "```", "", "```bash",
              "vllm serve DIR   # where the serving report below says vLLM can", "```", "",
              "## Serving report", "", "| target | servable | why not | needs |",
              "|---|---|---|---|"]
    for target, entry in report.items():
        if "servable" not in entry:  # float_tensors: not a target
            continue
        why = "; ".join(f"{reason} ({len(names)} layers)" for reason, names
                        in entry["reasons"].items()) or "-"
        lines.append(f"| {target} | {'yes' if entry['servable'] else 'no'} | {why} | "
                     f"{entry.get('requires', '')} |")
    limits = [(t, limit) for t, e in report.items() for limit in e.get("limits", ())]
    lines += [""] + [f"- {target}: {limit}" for target, limit in limits] if limits else []
    if "float_tensors" in report:
        kept = report["float_tensors"]
        lines += ["", f"Matrices left in float: {kept['count']} ({kept['elements']:,} weights)."]
    return "\n".join(lines) + "\n"
