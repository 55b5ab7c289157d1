"""python -m qat.export --ckpt RUN_CHECKPOINT --out DIR: pack a trained run for serving."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qat.models.checkpoint import model_from_checkpoint
from qat.export.writer import export_model


def card_facts(ckpt: str, config: dict) -> dict:
    """The model card's facts: the run's metrics.json beside its checkpoints/ when there is one."""
    model = config.get("model", {})
    facts = {"base_model": model.get("path") or model.get("name")}
    metrics = Path(ckpt).resolve().parent.parent / "metrics.json"
    if metrics.is_file():
        known = json.loads(metrics.read_text())
        facts.update({k: known[k] for k in ("recipe", "command", "fp_ppl", "ppl") if k in known})
    return facts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-export", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--out", required=True, help="export directory to create")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, config = model_from_checkpoint(args.ckpt)
        out = export_model(model, tokenizer, args.out, run=card_facts(args.ckpt, config))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
