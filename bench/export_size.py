"""Bits per weight of the exported Linears and total export size against the bf16 model.

python bench/export_size.py            # the default model (SmolLM2-135M) and the tiny model (g128)
Writes bench/results/export_size.json and the export_size section of BENCHMARKS.md.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, markdown_table, update_section, write_results  # noqa: E402

from qat.export.writer import export_model  # noqa: E402
from qat.models import ModelSpec, load_model  # noqa: E402
from qat.quant import QuantConfig, WeightSpec, prepare  # noqa: E402

SCHEMES = {  # name -> (model, spec)
    "W4 g64 sym": ("smollm2-135m", WeightSpec(bits=4, group_size=64)),
    "W4 g64 asym": ("smollm2-135m", WeightSpec(bits=4, group_size=64, symmetric=False)),
    "W8 per-channel sym": ("smollm2-135m", WeightSpec(bits=8, granularity="channel", group_size=None)),
    "W3 g64 asym": ("smollm2-135m", WeightSpec(bits=3, group_size=64, symmetric=False)),
    "W2 g64 asym": ("smollm2-135m", WeightSpec(bits=2, group_size=64, symmetric=False)),
    "W4 g128 sym": ("tiny", WeightSpec(bits=4, group_size=128)),
}


def bf16_bytes(model: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * 2
    return total


def measure(model_name: str, spec: WeightSpec) -> dict:
    model, tokenizer = load_model(ModelSpec(name=model_name))
    baseline = bf16_bytes(model)
    prepare(model, QuantConfig(weight=spec))
    with tempfile.TemporaryDirectory() as tmp:
        out = export_model(model, tokenizer, Path(tmp) / "export")
        linear_bits, linear_numel = 0, 0
        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                if key.endswith(("weight_packed", "weight_scale", "weight_zero_point")):
                    t = f.get_tensor(key)
                    linear_bits += t.numel() * t.element_size() * 8
                elif key.endswith("weight_shape"):
                    linear_numel += int(torch.prod(f.get_tensor(key)))
        weights_file = (out / "model.safetensors").stat().st_size
    return {"model": model_name, "scheme": spec.describe(), "bits_per_weight": round(linear_bits / linear_numel, 4),
            "quantized_params": linear_numel, "export_bytes": weights_file, "bf16_bytes": baseline,
            "size_ratio": round(weights_file / baseline, 3)}


def main() -> None:
    torch.set_num_threads(2)
    rows = [measure(model, spec) for model, spec in SCHEMES.values()]
    write_results("export_size", rows)
    body = "\n".join([
        "## Export size: bits per weight of the quantized Linears",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}",
        "",
        "bits_per_weight counts packed codes, bf16 scales and packed zero points over the Linear weights "
        "they encode; export_bytes is model.safetensors (embeddings and norms in bf16); size_ratio is "
        "export_bytes over the model's parameters in bf16 (tied embedding counted once).",
        "",
        markdown_table(rows, ["model", "scheme", "bits_per_weight", "quantized_params", "export_bytes",
                              "bf16_bytes", "size_ratio"]),
    ])
    update_section("export_size", body)
    print(body)


if __name__ == "__main__":
    main()
