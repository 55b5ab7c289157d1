"""python -m qat.export --ckpt RUN_CHECKPOINT --out DIR: pack a trained run for serving."""
from __future__ import annotations

import argparse
import sys

from qat.export.checkpoint import model_from_checkpoint
from qat.export.writer import export_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qat.export", description=__doc__)
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--out", required=True, help="export directory to create")
    args = parser.parse_args(argv)
    try:
        model, tokenizer, _ = model_from_checkpoint(args.ckpt)
        out = export_model(model, tokenizer, args.out)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
