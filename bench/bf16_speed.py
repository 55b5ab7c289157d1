"""What bf16 compute buys on this CPU: the training steps of both stages, float32 against bf16.

python bench/bf16_speed.py                  # default model, W2 g64 asym (the W2 recipe's scheme)
python bench/bf16_speed.py --repeats 1 --model tiny

End to end: one KD step of the whole quantized model (frozen float teacher, forward KL, batch 4 x
256, AdamW on weights and scales: optim.trainable=all) in float32, then under torch.autocast bf16
(what trainer.precision=bf16-mixed runs). Block stage: `train_blocks` on the first two decoder
blocks (16 sequences x 256 tokens, 2 epochs), blockwise.compute_dtype float32 then bfloat16. The two
kinds alternate in one process so that machine noise hits both alike; medians and their ratio are
reported. Whether bf16 keeps the quality is not measured here but in the quality table's rows.
Writes bench/results/bf16_speed.json and the bf16_speed section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command, machine, markdown_table, update_section, write_results  # noqa: E402

from qat.blockwise import BlockwiseSpec, train_blocks  # noqa: E402
from qat.distill import DistillSpec  # noqa: E402
from qat.distill.teacher import Distiller  # noqa: E402
from qat.models import ModelSpec, load_model  # noqa: E402
from qat.models.placement import native_bf16  # noqa: E402
from qat.quant import QuantConfig, WeightSpec, prepare  # noqa: E402

SCHEME = WeightSpec(bits=2, group_size=64, symmetric=False)
BATCH, SEQ = 4, 256


def e2e_step(student, distiller, optimizer, ids, bf16: bool) -> float:
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = distiller(student, ids)["loss"]
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def block_stage(student, teacher, ids, bf16: bool) -> float:
    """Seconds per optimizer step of the block stage on a fresh copy of the first two blocks."""
    model = copy.deepcopy(student)
    model.model.layers = model.model.layers[:2]
    spec = BlockwiseSpec(enabled=True, samples=ids.shape[0], seq_len=SEQ, epochs=2,
                         compute_dtype="bfloat16" if bf16 else "float32", progress=False)
    report = train_blocks(model, teacher, ids, spec)
    return sum(b.seconds for b in report.blocks) / sum(b.steps for b in report.blocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, _ = load_model(ModelSpec(name=args.model))
    student = copy.deepcopy(teacher).train()
    prepare(student, QuantConfig(weight=SCHEME))
    vocab = teacher.config.vocab_size
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    block_ids = torch.randint(0, vocab, (16, SEQ), generator=torch.Generator().manual_seed(1))
    distiller = Distiller(DistillSpec(), teacher)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-6)
    block_teacher = copy.deepcopy(teacher)
    block_teacher.model.layers = block_teacher.model.layers[:2]
    times = {k: [] for k in ("e2e_fp32", "e2e_bf16", "block_fp32", "block_bf16")}
    e2e_step(student, distiller, optimizer, ids, False)  # warm-up: allocator, kernels
    e2e_step(student, distiller, optimizer, ids, True)
    for _ in range(args.repeats):
        for bf16 in (False, True):
            kind = "bf16" if bf16 else "fp32"
            times[f"e2e_{kind}"] += [e2e_step(student, distiller, optimizer, ids, bf16)
                                     for _ in range(2)]
            times[f"block_{kind}"].append(block_stage(student, block_teacher, block_ids, bf16))
    load = [round(x, 2) for x in os.getloadavg()[:2]]
    rows = []
    for stage in ("e2e", "block"):
        fp32, bf16 = (statistics.median(times[f"{stage}_{k}"]) for k in ("fp32", "bf16"))
        rows.append({"stage": {"e2e": "end to end (KD step, trainable=all)",
                               "block": "block stage (per optimizer step)"}[stage],
                     "float32 s/step": f"{fp32:.3f}", "bf16 s/step": f"{bf16:.3f}",
                     "speed-up": f"{fp32 / bf16:.2f}x", "samples": len(times[f"{stage}_fp32"])})
    bf16_isa = native_bf16(torch.device("cpu"))  # AVX-512 BF16 or AMX
    result = {"model": args.model, "scheme": "W2 g64 asym", "batch": f"{BATCH} x {SEQ}",
              "rows": rows, "machine": machine(), "avx512_bf16": bf16_isa,
              "threads": torch.get_num_threads(), "load_average": load, "command": command()}
    write_results("bf16_speed", [result])
    print(markdown_table(rows, list(rows[0])))
    update_section("bf16_speed", "## bf16 compute on the CPU\n\n"
                   f"`{command()}` on {machine()} (AVX-512 BF16: "
                   f"{'yes' if bf16_isa else 'no'}), {torch.get_num_threads()} threads, load "
                   f"average {load}: the default model quantized W2 g64 asym, batch {BATCH} x "
                   f"{SEQ}; float32 and bf16 alternate in one process, medians. End to end is "
                   "`trainer.precision=bf16-mixed`, the block stage `blockwise.compute_dtype="
                   "bfloat16`; whether either keeps the quality is what the quality table's rows "
                   "measure.\n\n" + markdown_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
