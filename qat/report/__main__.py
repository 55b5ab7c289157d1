"""python -m qat.report SWEEP_DIR [--metric ppl|kl_mean|kl_p99|top1|cloze_acc]: report.md (table)
and report.png (perplexity, or the metric, against size) of a sweep.

SWEEP_DIR is a Hydra multirun directory (or any directory) whose run dirs hold metrics.json; they
are found recursively. report.json beside them holds the same numbers for scripts.
"""
from __future__ import annotations

import argparse
import sys

from qat.eval.report import METRICS, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-report", description=__doc__)
    parser.add_argument("sweep_dir", help="directory holding run dirs with metrics.json")
    parser.add_argument("--metric", default="ppl",
                        help=f"what the plot shows against size: one of {', '.join(METRICS)} "
                             "(report.png for ppl, else report_<metric>.png)")
    args = parser.parse_args(argv)
    try:
        md, png = write_report(args.sweep_dir, args.metric)
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(md.read_text())
    print(f"wrote {md} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
