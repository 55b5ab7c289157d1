"""Quick block-stage sweep: the first few decoder blocks of the default model, held-out error.

python bench/block_sweep.py '[{"start": "gptq"}, {"start": "rtn", "lr": 1e-3}]' [--recipe w2g64_kd]

Each config truncates the model to its first BLOCKS decoder blocks, prepares the recipe's scheme
(w3g64_kd unless --recipe names another), applies the start (`rtn` = the min/max grid, `gptq`,
`awq`; "skip": true measures the start alone), runs the block stage with the given `blockwise.*`
overrides (a dotted key such as "quant.weight.symmetric" is passed as it is), and reports the mean
squared error of the truncated model's last hidden state against the float model's on 16 held-out
training sequences (before and after the block stage). Minutes per config, not the hours of a full row: a
proxy for choosing block-stage settings, not a perplexity. Rows go to bench/results/block_sweep.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, markdown_table, update_section, write_json  # noqa: E402

BLOCKS = 3
RECIPE = "w3g64_kd"
RESULT_FILE = RESULTS / "block_sweep.json"


def run(config: dict, recipe: str = RECIPE) -> dict:
    import torch
    from conftest import compose_train

    from qat.blockwise import train_blocks
    from qat.data.tokens import calibration_ids, load_tokens
    from qat.ptq import quantize_model
    from qat.quant import prepare
    from qat.train.specs import build_specs
    from qat.train.steps import load_checked

    config = dict(config)
    start, skip = config.pop("start"), config.pop("skip", False)
    # a dotted key is a full override (e.g. "quant.weight.symmetric": false); others are blockwise.*
    cfg = compose_train([f"recipe={recipe}", "logger=none", f"quant.init={'null' if start == 'rtn' else start}"]
                        + [f"{k if '.' in k else 'blockwise.' + k}={_value(v)}"
                           for k, v in config.items()])
    specs = build_specs(cfg)
    torch.manual_seed(0)
    model, tokenizer = load_checked(specs.model)
    model.model.layers = model.model.layers[:BLOCKS]
    model.config.num_hidden_layers = BLOCKS
    data = load_tokens(specs.data, tokenizer)
    float_model = copy.deepcopy(model).eval()
    prepare(model, specs.quant)
    if specs.quant.init:
        ptq = replace(specs.ptq, progress=False, method=specs.quant.init)
        print(quantize_model(model, ptq, calibration_ids(data.train_blocks,
                                                         ptq.calibration_samples, ptq.seq_len)))
    held_out = data.train_blocks[2000:2016]

    def error() -> float:
        with torch.no_grad():
            a = model.model(input_ids=held_out).last_hidden_state
            b = float_model.model(input_ids=held_out).last_hidden_state
            return torch.nn.functional.mse_loss(a, b).item()

    before, t0 = error(), time.perf_counter()
    if not skip:
        spec = replace(specs.blockwise, progress=False)
        ids = calibration_ids(data.train_blocks, spec.samples, spec.seq_len, owner="blockwise")
        train_blocks(model, float_model, ids, spec, seed=0)
    budget = f"{specs.blockwise.samples}x{specs.blockwise.epochs}"  # the recipe's, unless overridden
    return {"start": start, "skip": skip, **config, "blocks": BLOCKS, "samples_x_epochs": budget,
            "before": round(before, 5), "after": round(error(), 5),
            "seconds": round(time.perf_counter() - t0)}


def _value(v) -> str:
    """A JSON value as Hydra reads it (false, not Python's False)."""
    return json.dumps(v) if isinstance(v, bool) or v is None else str(v)


KEYS = ("start", "skip", "blocks", "samples_x_epochs", "before", "after", "seconds", "recipe",
        "command", "note")


def table(rows: list[dict]) -> str:
    out = [{"recipe": r["recipe"].removeprefix("recipe="), "start": r["start"],
            "settings": ", ".join(f"{k}={v}" for k, v in r.items() if k not in KEYS) or "defaults",
            "block stage": "no" if r["skip"] else r.get("samples_x_epochs", "yes"),
            "error before": f"{r['before']:.5f}",
            "error after": f"{r['after']:.5f}", "after / before": f"{r['after'] / r['before']:.3f}",
            "seconds": r["seconds"], "command": f"`{r['command']}`"} for r in rows]
    return markdown_table(out, ["recipe", "start", "settings", "block stage", "error before",
                                "error after", "after / before", "seconds", "command"])


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="?", default="[]", help="JSON list of configs")
    parser.add_argument("--recipe", default=RECIPE, help="the recipe whose scheme is swept")
    parser.add_argument("--table", action="store_true", help="only rewrite BENCHMARKS.md")
    args = parser.parse_args(argv)
    rows = json.loads(RESULT_FILE.read_text()) if RESULT_FILE.exists() else []
    command = "python bench/block_sweep.py '" + args.configs + "'" + (
        f" --recipe {args.recipe}" if args.recipe != RECIPE else "")
    for config in [] if args.table else json.loads(args.configs):
        row = dict(run(config, args.recipe), recipe=f"recipe={args.recipe}", command=command)
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_json(RESULT_FILE, rows)
    notes = sorted({r["note"] for r in rows if r.get("note")})
    update_section("block_sweep", "## Block-stage sweep (first 3 blocks)\n\n"
                   "`python bench/block_sweep.py CONFIGS [--recipe NAME]`: the default model cut to "
                   f"its first {BLOCKS} blocks, the recipe's scheme; mean squared error of the last "
                   "hidden state against the float model's on 16 held-out training sequences, before "
                   "and after the block stage (a proxy for choosing settings, not a perplexity; errors "
                   "compare within a recipe only). " + " ".join(notes) + "\n\n" + table(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
