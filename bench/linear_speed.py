"""CPU speed of QuantizedLinear (torch's int4/int8 weight-only kernels) against bf16 and fp32 F.linear.

Claim measured: on the default model's Linear shapes (SmolLM2-135M) and a 4096x4096 layer, at batch 1, 8
and 32 tokens, how long one forward takes with W4 g64 (symmetric, asymmetric) and W8 per-channel weights,
relative to bf16 F.linear in the same run. fp32 F.linear is reported too: on CPUs without native bf16 it
is the faster float baseline. Timings are interleaved (one call of every variant per round) and the
median is kept, so background load hits every variant alike (the order is shuffled per round).

Writes bench/results/linear_speed.json and the `linear_speed` section of BENCHMARKS.md.
Run: python bench/linear_speed.py  [--threads 2] [--min-time 0.3]
"""
import argparse
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # run from a checkout without installing qat
from common import command, machine, update_section, write_results  # noqa: E402

from qat.kernels import QuantizedLinear  # noqa: E402

SHAPES = {  # name -> (out, in), SmolLM2-135M projections and one large layer
    "q_proj/o_proj": (576, 576), "k_proj/v_proj": (192, 576), "gate/up_proj": (1536, 576),
    "down_proj": (576, 1536), "4096x4096": (4096, 4096),
}
BATCHES = (1, 8, 32)
QUANT = {  # name -> (bits, group_size, symmetric)
    "w4g64": (4, 64, True), "w4g64_asym": (4, 64, False), "w8_channel": (8, None, True),
}


def make_layer(out_features, in_features, bits, group_size, symmetric, gen):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if group_size is None else in_features // group_size
    q = torch.randint(lo, hi + 1, (out_features, in_features), generator=gen)
    scale = (torch.rand(out_features, groups, generator=gen) * 0.01 + 1e-3).bfloat16().float()
    zp = None if symmetric else torch.randint(lo, hi + 1, (out_features, groups), generator=gen).float()
    layer = QuantizedLinear.from_quantized(q, scale, zp, bits, group_size)
    layer.prepare()  # layout conversion is a one-off load cost, not part of a forward
    return layer


def time_interleaved(fns: dict, min_time: float, min_rounds: int = 10, max_rounds: int = 500) -> tuple:
    """Median and minimum seconds per call of each fn, calling every fn once per round.

    The order is shuffled every round: whichever variant runs right after the fp32 baseline (which
    evicts the caches) would otherwise always pay for it.
    """
    for fn in fns.values():  # warm-up
        fn(), fn()
    samples = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    start = time.perf_counter()
    rounds = 0
    while rounds < min_rounds or (time.perf_counter() - start < min_time * len(fns) and rounds < max_rounds):
        rng.shuffle(order)
        for name in order:
            fn = fns[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
        rounds += 1
    return ({name: statistics.median(ts) for name, ts in samples.items()},
            {name: min(ts) for name, ts in samples.items()})


def run(min_time: float) -> list:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for shape_name, (n, k) in SHAPES.items():
        w = torch.randn(n, k, generator=gen) * 0.02
        w_bf16 = w.bfloat16()
        layers = {name: make_layer(n, k, *cfg, gen) for name, cfg in QUANT.items()}
        for m in BATCHES:
            x = torch.randn(m, k, generator=gen).bfloat16()
            x32 = x.float()
            fns = {"bf16_linear": lambda: F.linear(x, w_bf16), "fp32_linear": lambda: F.linear(x32, w)}
            fns.update({name: (lambda layer=layer: layer(x)) for name, layer in layers.items()})
            with torch.inference_mode():
                times, best = time_interleaved(fns, min_time)
            row = {"layer": shape_name, "out": n, "in": k, "batch": m,
                   "us": {name: round(t * 1e6, 1) for name, t in times.items()},
                   "min_us": {name: round(t * 1e6, 1) for name, t in best.items()},
                   "speedup_vs_bf16": {name: round(times["bf16_linear"] / t, 2) for name, t in times.items()},
                   "weight_bytes": {"bf16": n * k * 2,
                                    **{name: layer.weight_bytes() for name, layer in layers.items()}},
                   "backend": {name: layer.layout for name, layer in layers.items()}}
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


COLUMNS = ("bf16_linear", "fp32_linear", *QUANT)


def format_header() -> str:
    cells = [f"{c} us (x bf16)" for c in COLUMNS]
    return "| layer (out x in) | batch | " + " | ".join(cells) + " |\n|" + "---|" * (len(cells) + 2)


def format_row(row: dict) -> str:
    cells = [f"{row['us'][c]:.0f} ({row['speedup_vs_bf16'][c]:.2f}x)" for c in COLUMNS]
    return f"| {row['layer']} ({row['out']}x{row['in']}) | {row['batch']} | " + " | ".join(cells) + " |"


def markdown(rows: list, meta: dict) -> str:
    sizes = {r["layer"]: r["weight_bytes"] for r in rows}
    size_lines = [f"- {name}: bf16 {b['bf16']:,} B; " + ", ".join(f"{q} {b[q]:,} B" for q in QUANT)
                  for name, b in sizes.items()]
    return "\n".join([
        "## CPU linear speed: QuantizedLinear vs F.linear",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['machine']} ({meta['capability']}); load average {meta['loadavg']} at start, "
        f"{meta['loadavg_end']} at the end (other jobs on the machine distort 2-thread timings).",
        "",
        "Median microseconds per forward (bf16 activations; fp32 for the fp32 baseline), and speedup over "
        "bf16 F.linear measured in the same interleaved rounds (>1 is faster). w4g64: torch's int4 kernel; "
        "w4g64_asym: the same kernel with its zero term -zp * scale; w8_channel: torch's int8 kernel.",
        "",
        format_header(), *[format_row(r) for r in rows],
        "",
        "Bytes held per layer (QuantizedLinear.weight_bytes(): CPU layout, scales, zero points):",
        *size_lines,
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--min-time", type=float, default=0.3, help="seconds of timing per variant and cell")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {"command": command(), "machine": machine(), "threads": args.threads,
            "capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg": " ".join(f"{v:.2f}" for v in os.getloadavg())}
    print(format_header())
    rows = run(args.min_time)
    meta["loadavg_end"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    out = write_results("linear_speed", {"meta": meta, "rows": rows})
    update_section("linear_speed", markdown(rows, meta))
    print(f"wrote {out.relative_to(ROOT)} and BENCHMARKS.md")


if __name__ == "__main__":
    main()
