"""python -m qat.eval SOURCE [--data wiki] [--ood shakespeare|none] [--out eval.json]

Perplexity on the protocol of eval-protocol.md (wiki: last 5% of entries, 64 windows of 512 tokens;
Shakespeare: last 5% of plays, 32 windows) for SOURCE, which is any of:
  a run directory (checkpoints/last.ckpt) or a .ckpt file: the trained fake-quantized model;
  an export directory (config.json with quantization_config): packed weights, fused kernels;
  a float model: a Hugging Face model dir or a builtin name (smollm2-135m, tiny) or a hub id.
Next to it, the distance to the float model (--reference; by default the one the run or export
was made from): KL per token (mean, p99, max) and top-1 agreement on the same windows; and a
LAMBADA-style cloze accuracy on each set's held-out text (--cloze items), the float model's too.
The results go to eval.json beside what was evaluated (a run or export dir, a .ckpt's dir, a
model dir) or to --out.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from qat.data.protocol import protocol_sets
from qat.eval.cloze import ITEMS
from qat.eval.evaluate import evaluate, source_kind
from qat.eval.tables import text_table
from qat.io import check_writable, write_json

EVAL_FILE = "eval.json"
HARNESS_FILE = "lm_eval.json"  # the harness's own results, beside eval.json


def format_results(out: dict) -> str:
    results = out["results"].values()
    kl = any("kl_mean" in r for r in results)
    cloze = any("cloze_acc" in r for r in results)
    reference = (out.get("reference") or {}).get("results", {})

    def percent(value):
        return "" if value is None else f"{100 * value:.1f}%"

    rows = [(name, r["corpus"], r["n_windows"], f"{r['n_tokens']:,}", f"{r['ppl']:.4f}",
             *((f"{r['kl_mean']:.5f}", f"{r['kl_p99']:.4f}", f"{r['top1']:.4f}") if kl else ()),
             *((percent(r.get("cloze_acc")),) if cloze else ()),
             f"{r['seconds']:.1f}")
            for name, r in out["results"].items()]
    head = f"{out['source']} ({out['kind']}), windows of {out['window']} tokens"
    columns = ("set", "corpus", "windows", "tokens", "ppl",
               *(("KL mean", "KL p99", "top-1") if kl else ()), *(("cloze",) if cloze else ()),
               "seconds")
    lines = [head, text_table(columns, rows)]
    if reference:
        lines.append(f"float reference {out['reference']['source']}: " + "; ".join(
            f"{name} ppl {r['ppl']:.4f}" + (f", cloze {percent(r['cloze_acc'])}"
                                             if "cloze_acc" in r else "")
            for name, r in reference.items()))
    return "\n".join(lines)


def default_out(source: str) -> Path | None:
    """eval.json beside what is evaluated: in a run, export or model dir, beside a .ckpt; None
    for a builtin name or hub id (nothing on disk to sit beside)."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.parent / EVAL_FILE
    return path / EVAL_FILE if path.is_dir() else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="run dir, .ckpt, export dir, model dir or builtin name")
    parser.add_argument("--data", default="wiki",
                        help="in-domain corpus (builtin, file or hub id); none: no perplexity "
                             "(the harness's tasks alone)")
    parser.add_argument("--ood", default="shakespeare", help="out-of-domain corpus, or 'none'")
    parser.add_argument("--window", type=int, default=512, help="tokens per window")
    parser.add_argument("--windows", type=int, default=64, help="in-domain windows scored")
    parser.add_argument("--ood-windows", type=int, default=32, help="out-of-domain windows scored")
    parser.add_argument("--fraction", type=float, default=0.05, help="held-out fraction (entries)")
    parser.add_argument("--ood-fraction", type=float, default=0.05)
    parser.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "reference"),
                        help="export kernels: fastest (auto), torch's CPU kernels, or exact "
                             "float32 dequantization")
    parser.add_argument("--embedding-bits", type=int, choices=(8,), default=None,
                        help="export only: serve the embedding/head as int8 rows")
    parser.add_argument("--device", default="auto",
                        help="where the model computes: auto (the first CUDA device when one is "
                             "visible, else cpu) | cpu | cuda | cuda:N; a model larger than the "
                             "device's memory runs there one decoder block at a time")
    parser.add_argument("--reference", default="auto",
                        help="the float model to compare with (model dir, builtin name or hub "
                             "id): KL(P_float || P_model) per token (mean, p99, max) and top-1 "
                             "agreement on the same windows; auto (default): the model the run "
                             "or export was made from, when it is here; none: no comparison")
    parser.add_argument("--kl-top-k", type=int, default=256,
                        help="the reference's log-probs kept per position (the rest as one "
                             "bucket: a lower bound of the full KL, exact at the vocabulary)")
    parser.add_argument("--cloze", type=int, default=ITEMS,
                        help="LAMBADA-style items (last word of a held-out sentence, greedy) "
                             "per set; 0: none")
    parser.add_argument("--tasks", default=None,
                        help="lm-evaluation-harness tasks on the model as loaded here: names "
                             "(hellaswag,arc_easy,piqa,winogrande,mmlu,gsm8k,...) or a directory "
                             "of task YAMLs over local files (offline; DIR:name,... picks some); "
                             "results in lm_eval.json beside eval.json. Needs the .[eval] extra")
    parser.add_argument("--num-fewshot", type=int, default=None,
                        help="harness: few-shot examples per prompt (default: each task's)")
    parser.add_argument("--limit", type=float, default=None,
                        help="harness: at most this many examples per task (< 1: a fraction)")
    parser.add_argument("--task-batch-size", type=int, default=8,
                        help="harness: requests per forward pass")
    parser.add_argument("--log-samples", action="store_true",
                        help="harness: keep every request and the model's answer in lm_eval.json")
    parser.add_argument("--out", "--json", dest="out",
                        help=f"where the results go (default: {EVAL_FILE} beside SOURCE)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no bar over the windows of each set")
    args = parser.parse_args(argv)
    if args.kl_top_k < 1:
        print(f"error: --kl-top-k {args.kl_top_k}: must be >= 1", file=sys.stderr)
        return 2
    sets = [] if args.data.lower() == "none" else protocol_sets(
        args.data, None if args.ood.lower() == "none" else args.ood, args.windows,
        args.ood_windows, args.fraction, args.ood_fraction)
    reference = None if args.reference.lower() == "none" else args.reference
    then = None
    try:
        if args.tasks:  # unknown tasks are refused before any model loads
            from qat.eval.harness import select_tasks

            then = harness_stage(args, select_tasks(args.tasks))
        source_kind(args.source)
        out_path = Path(args.out) if args.out else default_out(args.source)
        try:  # refused before the evaluation, not after it
            check_writable(out_path.parent, "--out") if out_path is not None else None
        except PermissionError as err:
            if args.out:
                raise
            print(f"note: {err}; the results are printed only (--out names another place)",
                  file=sys.stderr)
            out_path = None
        out = evaluate(args.source, sets, window=args.window, batch_size=args.batch_size,
                       backend=args.backend, progress=args.progress,
                       embedding_bits=args.embedding_bits, device=args.device,
                       reference=reference, kl_top_k=args.kl_top_k, cloze=args.cloze,
                       then=then)
    except (FileNotFoundError, ValueError, OSError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    harness = out.pop("then", None)
    if sets:
        print(format_results(out))
        if reference == "auto" and "reference" not in out and out["kind"] != "float":
            print("note: no KL to the float model: the model this was made from is not here "
                  "(--reference MODEL names it)", file=sys.stderr)
    if harness is not None:
        from qat.eval.harness import summary_rows

        print(text_table(("task", "metric", "value", "stderr"), summary_rows(harness)))
    if out_path is not None:
        if harness is not None:
            write_json(out_path.parent / HARNESS_FILE, harness)
            out["lm_eval"] = {"file": HARNESS_FILE, "results": harness.get("results", {})}
        write_json(out_path, out)
        print(f"results: {out_path}")
    return 0


def harness_stage(args, tasks):
    """What evaluate runs last on the loaded model: the harness's `tasks` (select_tasks)."""
    from qat.eval.harness import run_tasks

    def run(loaded):
        return run_tasks(loaded.model, loaded.tokenizer, tasks, args.num_fewshot,
                         args.limit, args.task_batch_size, args.log_samples)
    return run


if __name__ == "__main__":
    sys.exit(main())
