"""QAT step time on a GPU: W4 g64 fake-quantized Linears against plain Linears, same stack.

python bench/gpu_qat_overhead.py [--dry-run]     (called by bench/gpu.sh)

Needs only torch and qat.quant (no transformers, hydra or datasets, which the device machine lacks):
a stack of Llama-shaped MLP blocks (hidden 4096, intermediate 11008, bf16 autocast off, fp32
weights, AdamW), batch 8 x 512 tokens. Float and QAT steps alternate; the median ratio is printed
and written to bench/results/gpu_qat_overhead.json. Goal (issue 8): at most 1.15x.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qat.quant import QuantConfig, WeightSpec, prepare  # noqa: E402


class Block(nn.Module):
    def __init__(self, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


def build(layers: int, hidden: int, inter: int, device: str, quantized: bool) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(hidden, inter) for _ in range(layers)]).to(device)
    if quantized:
        prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64), include=("*",),
                                   exclude=()))
    return model


def step(model, optimizer, x, sync) -> float:
    sync()
    start = time.perf_counter()
    model(x).float().pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    sync()
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run")
        return 2
    layers, hidden, inter, tokens = (2, 128, 256, 64) if args.dry_run else (4, 4096, 11008, 4096)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    models = {k: build(layers, hidden, inter, device, k == "qat") for k in ("float", "qat")}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}
    x = torch.randn(tokens, hidden, device=device)
    times = {"float": [], "qat": []}
    for i in range(args.steps + 2):
        for kind in ("float", "qat") if i % 2 == 0 else ("qat", "float"):
            t = step(models[kind], opts[kind], x, sync)
            if i >= 2:  # two warm-up rounds
                times[kind].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    peak = {}
    if device == "cuda":
        for kind in ("float", "qat"):
            torch.cuda.reset_peak_memory_stats()
            step(models[kind], opts[kind], x, sync)
            peak[kind] = torch.cuda.max_memory_allocated()
    row = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "shape": f"{layers} x MLP {hidden}->{inter}, {tokens} tokens",
           "float_step_ms": round(1e3 * med["float"], 2), "qat_step_ms": round(1e3 * med["qat"], 2),
           "time_ratio": round(med["qat"] / med["float"], 4),
           "memory_ratio": round(peak["qat"] / peak["float"], 4) if peak else None}
    print(row)
    name = "gpu_qat_overhead_dryrun.json" if args.dry_run else "gpu_qat_overhead.json"
    (ROOT / "bench" / "results" / name).write_text(json.dumps([row], indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
