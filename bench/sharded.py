"""Per-rank peak memory of FSDP2 against DDP and one process (issue 32).

    python bench/sharded.py                    # 24-block synthetic Llama (~310M), every training
    python bench/sharded.py --layers 4 --dry-run

A synthetic Llama (hidden 1024, MLP 2816, vocab 512: random weights from transformers' own config
class, float32, the tiny tokenizer) trained `trainer.max_steps=2` steps of W4 g64 fake
quantization as `python train.py model.path=DIR recipe=w4g64 data=tiny eval.fp_ppl=false
export.evaluate=false` (checkpoint and export written, the export not evaluated), end-to-end
training of the weights (`optim.trainable=weights`: weights, gradients and AdamW moments), of the
scales alone (`scales`: the codes held, int8) or of the weights distilled from the float model
(`distill=kd`, the teacher onloaded), in one process and in 2 gloo processes under `trainer=ddp`
and `trainer=fsdp2` (half the batch each).
Every rank runs this script as its entry point (Lightning's launcher starts rank 1 with the same
command), which writes the process's peak RSS (VmHWM, mapped file pages included) when it exits.
2 processes on 2 cores measure memory and correctness, not speed. Writes
bench/results/sharded.json and the `sharded` section of BENCHMARKS.md. Needs Linux.
"""
from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

RSS_DIR = "QAT_BENCH_RSS_DIR"  # set: this process is a run (a rank), not the bench

WIDTH = dict(hidden_size=1024, intermediate_size=2816, vocab_size=512, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
OVERRIDES = ["recipe=w4g64", "data=tiny", "eval.fp_ppl=false", "trainer.max_steps=2",
             "logger=none", "trainer.enable_progress_bar=false", "export.enabled=true",
             "export.evaluate=false", "data.block_size=128"]
MODES = {"one process": ["data.batch_size=4"],
         "ddp, 2 processes": ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
                              "data.batch_size=2"],
         "fsdp2, 2 processes": ["trainer=fsdp2", "trainer.accelerator=cpu", "trainer.devices=2",
                                "data.batch_size=2"]}


# what trains end to end: the weights (with their gradients and AdamW moments), the scales alone
# (codes held), or the weights distilled from the float model (the teacher onloaded from the
# model's files a block at a time on every rank)
TRAININGS = {"weights": ["optim.trainable=weights"], "scales": ["optim.trainable=scales"],
             "weights, KD": ["optim.trainable=weights", "distill=kd"]}


def as_rank() -> None:
    """Run train.py here, and write this process's peak RSS at exit, named by its rank."""
    rank = os.environ.get("LOCAL_RANK", "0")
    out = Path(os.environ[RSS_DIR]) / f"rank{rank}.json"
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from memory import PeakPerStage

    handler = PeakPerStage()  # each stage's own peak (VmHWM, reset at every stage mark)
    logger = logging.getLogger("qat.train")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)

    def write() -> None:
        handler.close_stage()
        stages: dict[str, int] = {}
        for name, peak in handler.peaks:
            stages[name] = max(stages.get(name, 0), peak)
        out.write_text(json.dumps({"rank": int(rank), "peak_rss": max(stages.values()),
                                   "stages": stages}))
    atexit.register(write)
    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    from qat.train.__main__ import main

    main()


def run(model_dir: Path, mode: list[str], training: list[str], work: Path) -> list[dict]:
    """Each rank's peak RSS, whole run and per stage, rank order."""
    rss_dir = Path(tempfile.mkdtemp(dir=work))
    run_dir = work / f"run-{rss_dir.name}"
    env = {**os.environ, RSS_DIR: str(rss_dir), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    command = [sys.executable, os.path.abspath(__file__), f"model.path={model_dir}", *OVERRIDES,
               *training, *mode, f"hydra.run.dir={run_dir}"]
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{out.stderr[-3000:]}")
    ranks = [json.loads(p.read_text()) for p in rss_dir.glob("rank*.json")]
    shutil.rmtree(run_dir, ignore_errors=True)
    return sorted(ranks, key=lambda r: r["rank"])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import RESULTS, command, machine, markdown_table, update_section, write_json
    from memory import build_model

    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--dry-run", action="store_true", help="no files written")
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="qat-sharded-"))
    rows, stages = [], []
    try:
        params = build_model(args.layers, work / "model", WIDTH)
        for trainable, training in TRAININGS.items():
            for name, mode in MODES.items():
                ranks = run(work / "model", mode, training, work)

                def per_rank(values, unit):
                    return " / ".join(unit(v) for v in values)
                whole = [r["peak_rss"] for r in ranks]
                e2e = [r["stages"].get("end-to-end", 0) for r in ranks]
                row = {"training": trainable, "run": name,
                       "peak RSS, GiB": per_rank(whole, lambda v: f"{v / 2**30:.2f}"),
                       "bytes / param": per_rank(whole, lambda v: f"{v / params:.1f}"),
                       "end-to-end stage, GiB": per_rank(e2e, lambda v: f"{v / 2**30:.2f}"),
                       "e2e bytes / param": per_rank(e2e, lambda v: f"{v / params:.1f}"),
                       "where the peak is": per_rank(ranks, lambda r: max(
                           r["stages"], key=r["stages"].get))}
                rows.append(row)
                print(row, flush=True)
                stages.append({"training": trainable, "run": name,
                               "stages per rank": [r["stages"] for r in ranks]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for row, raw in zip(rows, stages):  # the baseline: DDP's largest rank, same training
        ddp = next(r for r in stages if r["training"] == row["training"] and
                   r["run"].startswith("ddp"))
        worst = max(s.get("end-to-end", 0) for s in raw["stages per rank"])
        row["e2e vs ddp"] = round(worst / max(s.get("end-to-end", 0)
                                              for s in ddp["stages per rank"]), 2)
    if args.dry_run:
        return 0
    write_json(RESULTS / "sharded.json", {"params": params, "layers": args.layers,
                                          "width": WIDTH, "rows": rows, "stages": stages})
    body = "\n".join([
        "### Sharded training: per-rank peak memory (issue 32)",
        "",
        f"`{command()}` on {machine()} (each run's processes: one thread each); load average "
        f"before the run {load:.2f}. A synthetic "
        f"Llama of {args.layers} blocks ({params / 1e6:.0f}M parameters, float32, hidden "
        f"{WIDTH['hidden_size']}, MLP {WIDTH['intermediate_size']}), W4 g64, 2 training steps of "
        "4 x 128 tokens (2 x 128 per rank), peak RSS of each rank's process (rank 0 / rank 1; "
        "VmHWM, the model files' mapped pages included), for the whole run and for its "
        "end-to-end stage alone (the peak reset at each stage mark of train(cfg), as "
        "bench/memory.py does); the checkpoint and the export are written (FSDP2: a "
        "distributed checkpoint, the export read from it a block at a time), not evaluated; "
        "under FSDP2 rank 1 builds the model on the meta device and holds only its shards. "
        "`weights`: weights, gradients and AdamW moments train; "
        "`scales`: only the scales, the codes held as int8; `weights, KD`: the weights, "
        "distilled from the float model (`distill=kd`: the teacher onloaded from the model's "
        "files a block at a time on every rank). `e2e vs ddp`: the largest rank's "
        "end-to-end peak over DDP's, same training.",
        "",
        markdown_table(rows, list(rows[0])),
    ])
    update_section("sharded", body)
    return 0


if __name__ == "__main__":
    if os.environ.get(RSS_DIR):
        as_rank()
    else:
        sys.exit(main())
