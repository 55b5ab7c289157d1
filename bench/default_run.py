"""Wall time of the default job at a baseline commit and at HEAD, back to back (issue 30's bar: no
slower than the baseline plus the export's own time).

    python bench/default_run.py --baseline 7c5188a --pairs 2

The job is `bash run.sh`'s (`python train.py budget=short`, the default recipe on the embedded
model; setup skipped: this interpreter runs both). Each commit runs from its own git worktree under --work;
runs alternate baseline, HEAD, baseline, HEAD ... so that machine noise hits both alike, and the
float-ppl cache is cleared before each so that both do the same work. Per run: wall seconds and
peak RSS of the child (os.wait4), its stages from the `stage:` marks (`hydra.verbose=qat.train`)
where the commit has them, and the four perplexities of its summary (they must be equal). The
export's own time is HEAD's `export` stage; per pair the ratio is (HEAD - export) / baseline.
Writes bench/results/default_run.json and the default-run section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, command, machine, markdown_table, update_section, write_results  # noqa: E402

STAGE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[qat\.train\]\[DEBUG\] - stage: (.+)$")
PPL = re.compile(r"^(float ppl|ppl after quant\.init|ppl after block stage|ppl after end-to-end|"
                 r"exported model ppl)\s+(\d+\.\d+)$")


def stages(log: str) -> dict[str, float]:
    """Seconds from each `stage:` mark to the next (the last mark, `done`, ends them)."""
    marks = [(datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f"), m.group(2))
             for m in map(STAGE.match, log.splitlines()) if m]
    return {name: round((later - at).total_seconds(), 1)
            for (at, name), (later, _) in zip(marks, marks[1:])}


def perplexities(log: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in map(PPL.match, log.splitlines()) if m}


def trained_seconds(log: str) -> dict[str, int]:
    """The block stage's training seconds (its report line) and the end-to-end train time, which
    both commits print."""
    out = {}
    for key, pattern in (("blockwise", r"^blockwise: \d+ blocks .*, (\d+) s$"),
                         ("end-to-end", r"^train time\s+(\d+) s$")):
        found = re.search(pattern, log, re.MULTILINE)
        if found:
            out[key] = int(found.group(1))
    return out


def run_once(tree: Path, out: Path) -> dict:
    cache = Path(os.environ.get("QAT_CACHE", "~/.cache/qat")).expanduser() / "fp_ppl"
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_WAIT_POLICY": "PASSIVE"}
    load = os.getloadavg()
    start = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        # run.sh's budget: `budget=short` where the commit has it (before it, the recipe's own)
        short = ["budget=short"] if (tree / "qat" / "conf" / "budget" / "short.yaml").exists() else []
        child = subprocess.Popen([sys.executable, "train.py", *short, "hydra.verbose=qat.train",
                                  f"hydra.run.dir={out}"], cwd=tree, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    text = out.with_suffix(".log").read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"train.py failed in {tree}: {text[-2000:]}")
    return {"seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024,
            "stages": stages(text), "trained_s": trained_seconds(text), "ppl": perplexities(text),
            "load_average_before": load}


def section(result: dict) -> str:
    rows = []
    for i, (old, new) in enumerate(result["pairs"], 1):
        export = new["stages"].get("export", 0.0)
        rows.append({"pair": i, "baseline_s": old["seconds"], "head_s": new["seconds"],
                     "export_s": export, "ratio": round((new["seconds"] - export) / old["seconds"], 3),
                     "baseline_rss_GB": round(old["peak_rss_bytes"] / 1e9, 2),
                     "head_rss_GB": round(new["peak_rss_bytes"] / 1e9, 2),
                     "block_training_s": f"{old['trained_s'].get('blockwise')} / "
                                         f"{new['trained_s'].get('blockwise')}",
                     "end_to_end_s": f"{old['trained_s'].get('end-to-end')} / "
                                     f"{new['trained_s'].get('end-to-end')}",
                     "same_ppl": old["ppl"] == {k: v for k, v in new["ppl"].items()
                                                if k != "exported model ppl"}})
    ppl = " / ".join(f"{v}" for v in result["pairs"][0][1]["ppl"].values())
    return ("## The default job at HEAD against the commit before issue 30 (wall time)\n\n"
            f"`{result['command']}` on {result['machine']}: HEAD {result['head']} against "
            f"{result['baseline']}, alternating, fp-ppl cache cleared before each run (the "
            f"load average before each is in the json). ratio = (HEAD - its export "
            f"stage) / baseline (bar: <= 1); block_training_s and end_to_end_s: baseline / HEAD, "
            f"as each prints them. HEAD's perplexities (float / init / block stage / end-to-end / export): "
            f"{ppl}.\n\n"
            + markdown_table(rows, ["pair", "baseline_s", "head_s", "export_s", "ratio",
                                    "baseline_rss_GB", "head_rss_GB", "block_training_s", "end_to_end_s",
                                    "same_ppl"]))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", default="7c5188a", help="the commit to compare against")
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--work", default=None, help="worktrees and run dirs (default: a temp dir)")
    args = parser.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="qat-default-run-"))
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                          capture_output=True, check=True).stdout.strip()
    trees = {"baseline": work / "baseline", "head": work / "head"}
    for name, rev in (("baseline", args.baseline), ("head", head)):
        if not trees[name].exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), rev], cwd=ROOT,
                           check=True, capture_output=True)
    pairs = []
    try:
        for i in range(args.pairs):
            pair = [run_once(trees[name], work / f"{name}{i}") for name in ("baseline", "head")]
            print(f"pair {i + 1}: baseline {pair[0]['seconds']} s, HEAD {pair[1]['seconds']} s "
                  f"(export {pair[1]['stages'].get('export')} s)", flush=True)
            pairs.append(pair)
    finally:
        for tree in trees.values():
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           capture_output=True)
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    result = {"command": command(), "machine": machine(), "baseline": args.baseline,
              "head": head, "pairs": pairs}
    write_results("default_run", result)
    update_section("default_run", section(result))


if __name__ == "__main__":
    main(sys.argv[1:])
