"""GPU check and speed of the fused Triton W4A16 / W8A16 kernel against bf16 torch.matmul.

Claim measured: at batch M in {1, 2, ..., 128} on 4096x4096 and 8192x8192 layers, the time of
torch.ops.qat.quantized_linear (the whole op: allocation, kernel, cast) relative to a bf16 torch.matmul
of the same shape; the target is >= 3x faster at M = 1 on 8192x8192 (H200). Before timing, the kernel is
checked against the plain-torch reference on random data (W4 g128 symmetric and asymmetric, W8
per-channel), both through the autotuned op and with every config of the tuning space forced once (also
in the dry run, where the interpreter executes them on CPU). "_t" rows store the same words transposed,
(KW, N), so that word loads run along N: an experiment to decide whether a loader should transpose them.

Imports only torch, triton and qat.kernels / qat.format.pack: runs where the training stack is absent.
Writes bench/results/gpu_kernels.json (dry run: gpu_kernels_dryrun.json).
Run: bash bench/gpu.sh [--quick] | python bench/gpu_kernels.py --dry-run (CPU, TRITON_INTERPRET=1, tiny)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if "--dry-run" in sys.argv:  # the interpreter must be selected before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing qat

from qat.format.pack import pack  # noqa: E402
from qat.kernels import linear_reference  # noqa: E402
from qat.kernels import triton_linear  # noqa: E402  (registers torch.ops.qat.quantized_linear)

QUANT = {  # name -> (bits, group_size, symmetric)
    "w4g128_sym": (4, 128, True), "w4g128_asym": (4, 128, False), "w8_channel": (8, None, True),
}
TIMED = ("w4g128_sym", "w4g128_sym_t", "w8_channel")  # _t: the same words stored transposed, (KW, N)
CHECK_TOL = 2e-2  # max |y - ref| / max |ref|: bf16 output, and weights rounded to bf16 per element


def make_weights(n, k, bits, group_size, symmetric, device, seed=0):
    """Packed codes, bf16 scales, int8 zero points (or None), and the float32 scale for the reference."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    groups = 1 if group_size is None else k // group_size
    q = torch.randint(lo, hi + 1, (n, k), generator=gen)
    scale = (torch.rand(n, groups, generator=gen) * 0.01 + 1e-3).bfloat16()
    zp = None if symmetric else torch.randint(lo, hi + 1, (n, groups), generator=gen).to(torch.int8)
    return (pack(q, bits).to(device), scale.to(device), None if zp is None else zp.to(device))


def op(x, packed, scale, zp, bits, group_size, k):
    return torch.ops.qat.quantized_linear(x, packed, scale, zp, bits, group_size or -1, k)


def relative_error(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def check(n, k, ms, device, every_config: bool) -> list:
    """Triton vs reference, autotuned op for every M, and (optionally) every config once."""
    rows = []
    for name, (bits, group_size, symmetric) in QUANT.items():
        packed, scale, zp = make_weights(n, k, bits, group_size, symmetric, device)
        for m in ms:
            x = torch.randn(m, k, device=device).bfloat16()
            ref = linear_reference(x.float(), packed, scale, zp, bits, group_size, k)
            for layout, words in (("", packed), ("_t", packed.t().contiguous().t())):
                err = relative_error(op(x, words, scale, zp, bits, group_size, k), ref)
                rows.append({"quant": name + layout, "n": n, "k": k, "m": m, "config": "autotuned",
                             "max_rel_err": err, "ok": err < CHECK_TOL})
        if every_config:
            for config in triton_linear.gpu_configs():
                kwargs = {**config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
                m = 3 if config.kwargs["BLOCK_M"] == 1 else 37  # partial M tiles, several GEMV rows
                x = torch.randn(m, k, device=device).bfloat16()
                ref = linear_reference(x.float(), packed, scale, zp, bits, group_size, k)
                y = triton_linear.launch(x, packed, scale, zp, bits, group_size or -1, k, config=kwargs)
                err = relative_error(y, ref)
                rows.append({"quant": name, "n": n, "k": k, "m": m, "config": str(config.kwargs),
                             "max_rel_err": err, "ok": err < CHECK_TOL})
    return rows


def bench_fn(fn, device) -> float:
    """Median milliseconds: triton's do_bench (L2 flushed between calls) on CUDA, wall clock on CPU."""
    if device == "cuda":
        return triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5])
    fn()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def bench_graph(fn) -> float | None:
    """Median ms replayed in a CUDA graph: launch overhead removed, for both sides alike."""
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=200, quantiles=[0.5])
    except Exception as err:  # older triton or capture failure: report, do not fail the run
        print(f"  (cuda graph timing unavailable: {type(err).__name__}: {err})")
        return None


def speed(shapes, ms, device) -> list:
    rows = []
    for n, k in shapes:
        w = (torch.randn(n, k, device=device) * 0.02).bfloat16()
        weights = {name: make_weights(n, k, *QUANT[name], device) for name in QUANT}
        packed, scale, zp = weights["w4g128_sym"]
        weights["w4g128_sym_t"] = (packed.t().contiguous().t(), scale, zp)  # loads along N, not K
        for m in ms:
            x = torch.randn(m, k, device=device).bfloat16()
            t_bf16 = bench_fn(lambda: torch.matmul(x, w.t()), device)
            row = {"n": n, "k": k, "m": m, "bf16_matmul_ms": t_bf16}
            graphs = device == "cuda"
            if graphs:
                row["bf16_matmul_graph_ms"] = bench_graph(lambda: torch.matmul(x, w.t()))
            for name in TIMED:
                packed, scale, zp = weights[name]
                bits, group_size, _ = QUANT[name.removesuffix("_t")]
                fn = lambda: op(x, packed, scale, zp, bits, group_size, k)  # noqa: E731
                fn()  # autotune outside the timing
                row[f"{name}_ms"] = bench_fn(fn, device)
                row[f"{name}_speedup"] = t_bf16 / row[f"{name}_ms"]
                if graphs:
                    t_graph = bench_graph(fn)
                    row[f"{name}_graph_ms"] = t_graph
                    if t_graph and row["bf16_matmul_graph_ms"]:
                        row[f"{name}_graph_speedup"] = row["bf16_matmul_graph_ms"] / t_graph
                best = triton_linear.quantized_linear_tuned.best_config
                row[f"{name}_config"] = None if best is None else str(best.kwargs)
            rows.append(row)
            print(format_row(row), flush=True)
    return rows


def format_row(row) -> str:
    cells = [f"{row['n']}x{row['k']}", f"M={row['m']:<4}", f"bf16 {row['bf16_matmul_ms'] * 1e3:8.1f} us"]
    for name in TIMED:
        cells.append(f"{name} {row[f'{name}_ms'] * 1e3:8.1f} us ({row[f'{name}_speedup']:.2f}x)")
        if row.get(f"{name}_graph_speedup"):
            cells.append(f"graph {row[f'{name}_graph_speedup']:.2f}x")
    return " | ".join(cells)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny shapes")
    parser.add_argument("--quick", action="store_true", help="8192x8192 only, M in 1, 8, 32, 128")
    parser.add_argument("--skip-every-config", action="store_true", help="only check the autotuned op")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for the CPU interpreter check")
        return 2
    meta = {"torch": torch.__version__, "triton": triton.__version__, "dry_run": args.dry_run,
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (TRITON_INTERPRET=1)",
            "command": " ".join(["python bench/gpu_kernels.py", *sys.argv[1:]]),
            "date": time.strftime("%Y-%m-%d %H:%M")}
    print(meta)
    if args.dry_run:
        check_shape, check_ms, shapes, ms = (48, 256), (1, 3), [(64, 256)], (1, 2)
    else:
        check_shape, check_ms = (4096, 4096), (1, 3, 16, 33, 128)
        shapes = [(8192, 8192)] if args.quick else [(4096, 4096), (8192, 8192)]
        ms = (1, 8, 32, 128) if args.quick else (1, 2, 4, 8, 16, 32, 64, 128)
    t0 = time.time()
    checks = check(*check_shape, check_ms, device, every_config=not args.skip_every_config)
    failed = [c for c in checks if not c["ok"]]
    print(f"correctness: {len(checks) - len(failed)}/{len(checks)} ok, worst max_rel_err "
          f"{max(c['max_rel_err'] for c in checks):.2e} ({time.time() - t0:.0f}s)")
    for c in failed:
        print("  FAILED", c)
    rows = speed(shapes, ms, device)
    out = ROOT / "bench" / "results" / ("gpu_kernels_dryrun.json" if args.dry_run else "gpu_kernels.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "checks": checks, "speed": rows}, indent=1) + "\n")
    print(f"wrote {out.relative_to(ROOT)} ({time.time() - t0:.0f}s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
