"""Greedy decode speed when other processes share the cores: quiet, then with busy competitors.

python bench/decode_contention.py [--tokens 128] [--competitors 4] [--repeats 3] [--model NAME]

The served model is bench/decode.py's fastest: the W4 g64 export in float32 with the int8 table,
decoded by qat.serve.decode.greedy (one native call per token, on csrc/team.c's team). Each team
size runs on a quiet machine and then beside `--competitors` busy-looping Python processes at the
same priority: `auto` (the default, threads=None: all cores for a one-call token), one thread, and
all of them given explicitly. Run it alone: the quiet rows need a quiet machine
(the load average before each phase is recorded). Writes bench/results/decode_contention.json and
the decode_contention section of BENCHMARKS.md. OMP_WAIT_POLICY is left as the caller set it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, markdown_table, update_section, write_results  # noqa: E402

from qat.serve.decode import greedy  # noqa: E402
from qat.export.load import load_quantized  # noqa: E402
from qat.export.writer import export_model  # noqa: E402
from qat import native  # noqa: E402
from qat.models import ModelSpec, load_model  # noqa: E402
from qat.quant import QuantConfig, WeightSpec, prepare  # noqa: E402

PROMPT = "The history of the printing press begins"
BUSY = "while True: pass"


def rate(model, ids, tokens: int, threads: int | None) -> float:
    greedy(model, ids, 4, threads=threads)  # warm up
    start = time.perf_counter()
    greedy(model, ids, tokens, threads=threads)
    return tokens / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--competitors", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="rounds; the median is reported")
    args = parser.parse_args()
    if not native.available():
        raise SystemExit("no native kernels here: the contention bench measures them")
    model, tokenizer = load_model(ModelSpec(name=args.model))
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    prepare(model, QuantConfig(weight=WeightSpec(bits=4, group_size=64)))
    with tempfile.TemporaryDirectory() as tmp:
        export_model(model, tokenizer, Path(tmp) / "export")
        served = load_quantized(Path(tmp) / "export", dtype=torch.float32, embedding_bits=8)
    del model
    most = native.max_threads()
    sizes = [("auto", None), ("1", 1)] + ([(str(most), most)] if most > 1 else [])
    rows = []
    for competitors in (0, args.competitors):
        procs = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(competitors)]
        try:
            time.sleep(3 if competitors else 0)
            load = os.getloadavg()[0]
            rates: dict[str, list[float]] = {name: [] for name, _ in sizes}
            for round_ in range(args.repeats):  # rounds, in alternating order: drift hits all
                for name, threads in sizes[::-1] if round_ % 2 else sizes:
                    rates[name].append(rate(served, ids, args.tokens, threads))
            for name, _ in sizes:
                rows.append({"threads": name, "competing_processes": competitors,
                             "tokens_per_s": round(statistics.median(rates[name]), 2),
                             "tokens": args.tokens, "repeats": args.repeats,
                             "load_before": round(load, 2)})
                print(rows[-1], flush=True)
        finally:
            for p in procs:
                p.kill()
                p.wait()
        time.sleep(2)
    quiet = {r["threads"]: r["tokens_per_s"] for r in rows if r["competing_processes"] == 0}
    for r in rows:
        r["vs_quiet_auto"] = round(r["tokens_per_s"] / quiet["auto"], 3)
    write_results("decode_contention", rows)
    loaded = {r["threads"]: r["tokens_per_s"] for r in rows if r["competing_processes"]}
    update_section("decode_contention", "## Decode under contention (greedy, CPU)\n\n"
                   f"`{command()}` on {machine()}: the W4 g64 export (float32, int8 table) "
                   f"decoding {args.tokens} tokens with qat.serve.decode.greedy (median of "
                   f"{args.repeats} rounds over the team sizes, alternating their order), quiet and beside "
                   f"{args.competitors} busy-looping processes at the same priority. `auto` is the "
                   "default (threads=None: the whole token is one native call on csrc/team.c's "
                   f"team of all cores, whose threads never wait for each other); `{most}` names "
                   "that size explicitly. Loaded `auto` keeps "
                   f"{loaded['auto'] / quiet['auto']:.2f}x of its quiet speed (goal >= 0.25x; "
                   f"`{most}` threads keep {loaded.get(str(most), 0) / quiet.get(str(most), 1):.2f}x); "
                   f"quiet `auto` runs at {quiet['auto'] / quiet.get(str(most), quiet['auto']):.3f}x "
                   f"the fixed `{most}` threads.\n\n"
                   + markdown_table(rows, ["threads", "competing_processes", "tokens_per_s",
                                           "vs_quiet_auto", "load_before"]))


if __name__ == "__main__":
    main()
