"""python -m qat.export --ckpt RUN_CHECKPOINT --out DIR: pack a trained run for serving."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from qat.export.convert import served_from_checkpoint
from qat.export.spec import ExportSpec
from qat.export.writer import export_model
from qat.format.shards import parse_size


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
    parser.add_argument("--max-shard-size", default=ExportSpec.max_shard_size,
                        help="weights files of at most this size, e.g. 5GB, 500MB (default: "
                             "%(default)s; Hugging Face's sharded layout with an index)")
    args = parser.parse_args(argv)
    try:
        max_bytes = parse_size(args.max_shard_size, "--max-shard-size")
        # a decoder block in float at a time: a run of any size exports on one machine
        model, tokenizer, config = served_from_checkpoint(args.ckpt, torch.bfloat16)
        out = export_model(model, tokenizer, args.out, run=card_facts(args.ckpt, config),
                           max_shard_bytes=max_bytes)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
