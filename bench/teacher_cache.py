"""The teacher's top-k cache (distill.cache_top_k) against onloading the teacher every step.

    python bench/teacher_cache.py [--steps 8] [--k 64 256]

The default model (SmolLM2-135M, vocabulary 49152, its teacher onloaded from its files) through
`python train.py recipe=w4g64_kd quant.weight.symmetric=true trainer.precision=32-true
blockwise=none quant.init=rtn trainer.max_steps=STEPS` with the
perplexities and the export off, once with the teacher run in every step (the baseline, in the
same invocation) and once per k with the cache. Each run is a child process; per stage it records
seconds and peak RSS (VmHWM, reset at each stage mark as bench/memory.py does).

The cache holds the blocks the run reads, so building it costs one teacher forward per block
(batched, without the student); a step then skips the teacher. It pays off when the blocks are
read more than once: break-even epochs = build seconds / (steps x seconds saved per step).

Writes bench/results/teacher_cache.json and the teacher-cache section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command, machine, markdown_table, update_section, write_json  # noqa: E402
from memory import PeakPerStage  # noqa: E402

# the symmetric grid in float32: w4g64_kd's when the table was measured (2026-12-07)
OVERRIDES = ["recipe=w4g64_kd", "quant.weight.symmetric=true", "trainer.precision=32-true",
             "blockwise=none", "quant.init=rtn", "eval.fp_ppl=false", "eval.stage_ppl=false",
             "export.enabled=false", "logger=none", "trainer.enable_progress_bar=false"]


class TimedStages(PeakPerStage):
    """PeakPerStage that also keeps each stage's seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.started, self.seconds = time.perf_counter(), []

    def close_stage(self) -> None:
        super().close_stage()
        now = time.perf_counter()
        self.seconds.append((self.current, now - self.started))
        self.started = now


def child(out: str, *overrides: str) -> None:
    from hydra import compose, initialize_config_dir

    import qat
    from qat.train import train

    handler = TimedStages()
    logger = logging.getLogger("qat.train")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    conf = Path(qat.__file__).resolve().parent / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    with tempfile.TemporaryDirectory() as run_dir:
        metrics = train(cfg, run_dir=run_dir)
        cache = Path(run_dir, "teacher_cache")
        cache_bytes = sum(f.stat().st_size for f in cache.iterdir()) if cache.is_dir() else 0
    handler.close_stage()
    write_json(Path(out), {"peaks": dict(handler.peaks), "seconds": dict(handler.seconds),
                           "train_seconds": metrics["train_seconds"], "steps": metrics["steps"],
                           "first_loss": metrics["first_loss"], "last_loss": metrics["last_loss"],
                           "ppl": metrics["ppl"], "cache_bytes": cache_bytes})


def run(steps: int, k: int, work: Path) -> dict:
    out = work / f"k{k}.json"
    subprocess.run([sys.executable, __file__, "--child", str(out), *OVERRIDES,
                    f"trainer.max_steps={steps}", f"distill.cache_top_k={k}"], check=True)
    got = json.loads(out.read_text())
    return {"k": k, "steps": got["steps"],
            "cache_s": round(got["seconds"].get("teacher cache", 0.0), 1),
            "step_s": round(got["train_seconds"] / max(got["steps"], 1), 2),
            "e2e_peak_gib": round(got["peaks"]["end-to-end"] / 2**30, 2),
            "cache_mib": round(got["cache_bytes"] / 2**20, 1),
            "first_loss": round(got["first_loss"], 5), "last_loss": round(got["last_loss"], 5),
            "ppl": round(got["ppl"], 3)}


def section(result: dict) -> str:
    rows = result["rows"]
    base = rows[0]
    for r in rows:
        saved = base["step_s"] - r["step_s"]
        r["step_ratio"] = round(r["step_s"] / base["step_s"], 3)
        r["total_s"] = round(r["cache_s"] + r["steps"] * r["step_s"], 1)
        r["break_even_epochs"] = round(r["cache_s"] / (r["steps"] * saved), 2) \
            if r["k"] and saved > 0 else ("never" if r["k"] else "")
    cols = ["k", "steps", "cache_s", "step_s", "step_ratio", "total_s", "break_even_epochs",
            "e2e_peak_gib", "cache_mib", "first_loss", "last_loss", "ppl"]
    return "\n".join([
        "## The teacher's top-k cache against onloading the teacher (issue 30)",
        "",
        f"`{result['command']}` on {result['machine']}, load average before "
        f"{result['load_before']}. SmolLM2-135M (vocabulary 49152), "
        f"`{' '.join(OVERRIDES[:6])}`, data.batch_size 4 x 256 tokens; k=0 is the teacher "
        "onloaded from its files and run in every step (the baseline, same invocation). "
        "`cache_s`: building the cache (one batched teacher forward per block the run reads); "
        "`step_s`: end-to-end seconds per step; `total_s`: both; `break_even_epochs`: how many "
        "times each block must be read for the cache to win; `e2e_peak_gib`: the end-to-end "
        "stage's peak RSS.",
        "",
        markdown_table(rows, cols),
    ])


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        child(*argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--k", type=int, nargs="+", default=[64, 256])
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        rows = [run(args.steps, k, Path(work)) for k in [0, *args.k]]
    result = {"command": command(), "machine": machine(), "load_before": round(load, 2),
              "rows": rows}
    body = section(result)
    write_json(RESULTS / "teacher_cache.json", result)
    update_section("teacher-cache", body)
    print(body)


if __name__ == "__main__":
    main(sys.argv[1:])
