"""Peak memory of each stage of a run against model size (issue 30).

    python bench/memory.py                                  # 2, 4, 8 layers x w4g64_kd, w4g64
    python bench/memory.py --layers 2 4 8 16 --recipes w4g64_kd w4g64_kd:model.gradient_checkpointing=true
    python bench/memory.py --add --layers 2 8 --recipes w3g64_kd  # beside the recorded rows

Synthetic Llamas of one family (hidden 2048, MLP 5632, vocab 512: random weights from transformers'
own config class, saved as float32 safetensors with the tiny tokenizer), each run through the
pipeline as `python train.py model.path=DIR recipe=R data=tiny blockwise.samples=4
eval.fp_ppl=false eval.stage_ppl=false trainer.max_steps=2` (the export included). Every run is a
child process; at each stage mark of `train(cfg)` (qat.train.steps.stage) the child reads the
kernel's peak RSS since the previous mark (VmHWM: anonymous and mapped file pages) and resets it
(/proc/self/clear_refs 5), so each row is that stage's own peak; the whole run's is the largest. The fit is peak RSS of the whole
run (the largest stage) against parameters, least squares, per recipe.

Writes bench/results/memory.json (rows, fit) and the memory section of BENCHMARKS.md. Needs Linux.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, command, machine, markdown_table, update_section, write_json  # noqa: E402

WIDTH = dict(hidden_size=2048, intermediate_size=5632, vocab_size=512, num_attention_heads=16,
             num_key_value_heads=16, max_position_embeddings=2048, tie_word_embeddings=False)
OVERRIDES = ["data=tiny", "eval.fp_ppl=false", "eval.stage_ppl=false", "trainer.max_steps=2",
             "logger=none", "trainer.enable_progress_bar=false", "ptq.progress=false",
             "export.enabled=true"]
BLOCKS = ["blockwise.samples=4", "blockwise.progress=false"]  # recipes with a block stage


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class PeakPerStage(logging.Handler):
    """At every `stage: NAME` record: the peak RSS of the stage that ended, then a fresh peak."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.current, self.peaks = "startup", []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith("stage: "):
            self.close_stage()
            self.current = message.removeprefix("stage: ")

    def close_stage(self) -> None:
        self.peaks.append((self.current, _status("VmHWM")))
        Path("/proc/self/clear_refs").write_text("5")  # the kernel's peak RSS starts again


def child(model_dir: str, recipe: str, run_dir: str, out: str, *extra: str) -> None:
    """Run one job in this process (`extra`: more overrides, last) and write its per-stage peaks
    to `out`."""
    from hydra import compose, initialize_config_dir

    import qat
    from qat.train import train

    handler = PeakPerStage()
    logger = logging.getLogger("qat.train")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    conf = Path(qat.__file__).resolve().parent / "conf"
    overrides = [f"model.path={model_dir}", f"recipe={recipe}", *OVERRIDES]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
        if cfg.blockwise.enabled:
            cfg = compose(config_name="train", overrides=overrides + BLOCKS + list(extra))
        elif extra:
            cfg = compose(config_name="train", overrides=overrides + list(extra))
    start = time.perf_counter()
    train(cfg, run_dir=run_dir)
    handler.close_stage()
    # clear_refs resets ru_maxrss too (both are the mm's high-water mark): the run's peak is the
    # largest stage's
    write_json(Path(out), {"peaks": handler.peaks, "seconds": time.perf_counter() - start,
                           "peak": max(peak for _, peak in handler.peaks)})


def build_model(layers: int, directory: Path, width: dict = WIDTH) -> int:
    """A random Llama of `width` with `layers` blocks, saved in float32; returns its
    parameters."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.models.tiny import tiny_tokenizer

    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, **width)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(directory)
    tokenizer = tiny_tokenizer(width["vocab_size"])
    tokenizer.model_max_length = width["max_position_embeddings"]
    tokenizer.save_pretrained(directory)
    return params


def predicted(model_dir: Path, recipe: str, extra: list[str]) -> dict[str, int]:
    """qat-footprint's prediction of each stage's peak host bytes for the same run."""
    from qat.footprint.__main__ import run_report

    try:
        stages = run_report(str(model_dir), recipe, [*OVERRIDES, *BLOCKS, *extra])[1]["stages"]
    except ValueError:  # a recipe without a block stage has no blockwise.samples to set
        stages = run_report(str(model_dir), recipe, [*OVERRIDES, *extra])[1]["stages"]
    return {r["stage"]: r["host_bytes"] for r in stages}


def repredict() -> None:
    """The recorded rows' predictions again (after the footprint's arithmetic changed), from
    config-only model dirs: the prediction reads config.json alone."""
    from transformers import AutoConfig

    result = json.loads((RESULTS / "memory.json").read_text())
    guesses: dict[tuple, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for row in result["rows"]:
            key = (row["layers"], row["recipe"])
            if key not in guesses:
                directory = Path(tmp) / f"llama-{row['layers']}"
                if not directory.exists():
                    AutoConfig.for_model("llama", num_hidden_layers=row["layers"],
                                         **WIDTH).save_pretrained(directory)
                name, *extra = row["recipe"].split(":")
                guesses[key] = predicted(directory, name, extra)
            guess = guesses[key]
            row["predicted_bytes"] = max(guess.values()) if row["phase"] == "whole run" \
                else guess.get(row["phase"])
    write_json(RESULTS / "memory.json", result)
    update_section("memory", section(result))


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def measure(layers: int, recipes: list[str], work: Path) -> list[dict]:
    model_dir = work / f"llama-{layers}"
    params = build_model(layers, model_dir)
    rows = []
    for index, recipe in enumerate(recipes):
        name, *extra = recipe.split(":")  # NAME:key=value:key=value, a recipe with overrides
        run_dir, out = work / f"run-{layers}-{index}", work / f"peaks-{layers}-{index}.json"
        subprocess.run([sys.executable, __file__, "--child", str(model_dir), name, str(run_dir),
                        str(out), *extra], check=True,
                       env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        result = json.loads(out.read_text())
        disk = disk_bytes(run_dir)
        guess = predicted(model_dir, name, extra)
        for phase, peak in result["peaks"]:
            rows.append({"recipe": recipe, "params": params, "layers": layers, "phase": phase,
                         "peak_rss_bytes": peak, "disk_bytes": disk,
                         "predicted_bytes": guess.get(phase)})
        rows.append({"recipe": recipe, "params": params, "layers": layers, "phase": "whole run",
                     "peak_rss_bytes": result["peak"], "disk_bytes": disk,
                     "predicted_bytes": max(guess.values()),
                     "seconds": round(result["seconds"], 1)})
        print(f"{layers} layers ({params / 1e9:.3f}B), {recipe}: peak {result['peak'] / 2**30:.2f}"
              f" GiB in {result['seconds']:.0f} s", flush=True)
        shutil.rmtree(run_dir)
    shutil.rmtree(model_dir)
    return rows


def fit(rows: list[dict]) -> dict[str, dict]:
    """Per recipe: least-squares slope and intercept of the whole run's peak RSS on parameters."""
    out = {}
    for recipe in sorted({r["recipe"] for r in rows}):
        points = [(r["params"], r["peak_rss_bytes"]) for r in rows
                  if r["recipe"] == recipe and r["phase"] == "whole run"]
        if len(points) < 2:
            continue
        n = len(points)
        mx, my = sum(p for p, _ in points) / n, sum(b for _, b in points) / n
        slope = sum((p - mx) * (b - my) for p, b in points) / sum((p - mx) ** 2 for p, _ in points)
        out[recipe] = {"slope_bytes_per_param": round(slope, 2),
                       "intercept_bytes": round(my - slope * mx)}
    return out


def section(result: dict) -> str:
    gib = 2**30
    whole = [r for r in result["rows"] if r["phase"] == "whole run"]
    stages = {}
    for r in result["rows"]:
        if r["phase"] != "whole run":
            stages.setdefault((r["recipe"], r["layers"]), []).append(r)
    table = [{"recipe": r["recipe"], "layers": r["layers"], "params": f"{r['params'] / 1e9:.3f}B",
              "peak RSS": f"{r['peak_rss_bytes'] / gib:.2f} GiB",
              "bytes/param": f"{r['peak_rss_bytes'] / r['params']:.1f}",
              "largest stage": max(stages[(r["recipe"], r["layers"])],
                                   key=lambda s: s["peak_rss_bytes"])["phase"],
              "predicted": f"{r['predicted_bytes'] / gib:.2f} GiB",
              "error": f"{r['predicted_bytes'] / r['peak_rss_bytes'] - 1:+.0%}",
              "run dir on disk": f"{r['disk_bytes'] / gib:.2f} GiB", "seconds": r.get("seconds")}
             for r in whole]
    staged = [r for r in result["rows"] if r.get("predicted_bytes") and r["phase"] != "whole run"]
    worst = max(staged, key=lambda r: abs(r["predicted_bytes"] / r["peak_rss_bytes"] - 1),
                default=None)
    fits = "; ".join(f"{k}: {v['slope_bytes_per_param']} bytes/param + "
                     f"{v['intercept_bytes'] / gib:.2f} GiB" for k, v in result["fit"].items())
    return ("## Memory against model size (issue 30)\n\n"
            f"`{result['command']}` on {result['machine']}. Peak RSS as the kernel counts it "
            "(VmHWM, mapped file pages included), per stage and for the whole run; "
            "synthetic Llamas (hidden 2048, MLP 5632, vocab 512), float32 files, `data=tiny "
            "blockwise.samples=4`, float and stage perplexities off, 2 end-to-end steps, the export. "
            f"Slope of peak RSS on parameters (bar: <= 1.5 bytes/param): {fits or 'one size only'}."
            " `predicted`: `qat-footprint --model DIR --recipe R` with the same overrides, from "
            "config.json alone (bar: within 15%)"
            + (f"; its worst stage: {worst['recipe']} {worst['layers']} layers {worst['phase']}, "
               f"{worst['predicted_bytes'] / worst['peak_rss_bytes'] - 1:+.0%}" if worst else "")
            + ".\n\n" + markdown_table(table, ["recipe", "layers", "params", "peak RSS",
                                               "bytes/param", "largest stage", "predicted", "error",
                                               "run dir on disk", "seconds"]))


def main(argv: list[str]) -> None:
    if argv and argv[0] == "--child":
        child(*argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--recipes", nargs="+", default=[
        "w4g64_kd", "w4g64_kd:model.gradient_checkpointing=true", "w4g64"],
        help="recipe names, each optionally with :key=value overrides")
    parser.add_argument("--work", default=None, help="where models and runs go (default: a temp dir)")
    parser.add_argument("--add", action="store_true",
                        help="keep the recorded rows of other (recipe, layers) pairs beside these")
    parser.add_argument("--predict-only", action="store_true",
                        help="recompute qat-footprint's predictions for the recorded rows")
    args = parser.parse_args(argv)
    if args.predict_only:
        repredict()
        return
    work = Path(args.work or tempfile.mkdtemp(prefix="qat-memory-"))
    load_before = os.getloadavg()  # a peak measured beside another heavy job is still a peak,
    rows = []                      # but its seconds are not a result
    try:
        for layers in args.layers:
            rows += measure(layers, args.recipes, work)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    earlier = json.loads((RESULTS / "memory.json").read_text()) \
        if (RESULTS / "memory.json").is_file() else {}
    commands = command()
    if args.add and earlier:  # measured pairs replace their earlier rows, the others stay
        new = {(r["recipe"], r["layers"]) for r in rows}
        rows = [r for r in earlier["rows"] if (r["recipe"], r["layers"]) not in new] + rows
        commands = f"{earlier['command']}` and `{commands}"
    result = {"command": commands, "machine": machine(),
              "load_average_before": load_before, "rows": rows, "fit": fit(rows),
              "larger_than_memory": earlier.get("larger_than_memory")}  # bench/larger_than_memory.py
    write_json(RESULTS / "memory.json", result)
    update_section("memory", section(result))
    print(json.dumps(result["fit"], indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
