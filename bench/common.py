"""Shared by the bench/ scripts: result files and BENCHMARKS.md sections, machine facts."""
from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

from qat.io import write_json, write_text  # noqa: E402
RESULTS = ROOT / "bench" / "results"
BENCHMARKS = ROOT / "BENCHMARKS.md"


def command() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])


def machine() -> str:
    import torch
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")


def write_results(name: str, rows: list[dict]) -> Path:
    path = RESULTS / f"{name}.json"
    write_json(path, rows)
    return path


def section(name: str) -> str | None:
    """The body of BENCHMARKS.md's section `name` as written (None when it has none)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else ""
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def previous_stamp(name: str) -> str | None:
    """The machine and date section `name` names ("... on STAMP. Default model"): a --table
    rebuild keeps them, since it measures nothing."""
    import re

    found = re.search(r"` on (.*?)\. Default model", section(name) or "")
    return found.group(1) if found else None


def update_section(name: str, body: str) -> None:
    """Replace (or append) the BENCHMARKS.md section between `<!-- name:start/end -->` markers."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{body.strip()}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    write_text(BENCHMARKS, text)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
