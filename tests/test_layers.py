"""Imports run one way: each part of qat imports only parts below it (function-local imports too).

The layers, bottom up: the integer format and the native C code have no qat dependencies but io;
quant and kernels build on them; models, then export / ptq / prune / distill; then eval, the block
stage and serving; Lightning on top; the commands above everything. A new upward import (a cycle in
waiting) fails here with the module that made it.
"""
import ast
from pathlib import Path

import pytest

QAT = Path(__file__).resolve().parents[1] / "qat"

LAYERS = [
    {"io"},
    {"assets", "format"},
    {"native", "data"},
    {"quant", "kernels"},
    {"models"},
    {"export", "ptq", "prune", "distill"},
    {"eval", "blockwise", "serve"},
    {"lightning"},
    {"train", "footprint", "report", "__init__", "conf"},
]
RANK = {part: rank for rank, parts in enumerate(LAYERS) for part in parts}


def part_of(path: Path) -> str:
    """The top-level part a file belongs to: qat/quant/spec.py -> quant, qat/io.py -> io."""
    relative = path.relative_to(QAT).with_suffix("").parts
    return relative[0]


def qat_imports(path: Path) -> set[str]:
    """Top-level parts of qat that `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module == "qat":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("qat."):
                found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("qat.")}
    return found


SOURCES = sorted(QAT.rglob("*.py"))


def test_every_part_has_a_layer():
    parts = {part_of(p) for p in SOURCES}
    assert parts <= set(RANK), f"parts without a layer in LAYERS: {sorted(parts - set(RANK))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(QAT)))
def test_imports_point_down(path):
    part = part_of(path)
    upward = {other for other in qat_imports(path) - {part}
              if other in RANK and RANK[other] >= RANK[part]}
    assert not upward, f"{path.relative_to(QAT)} ({part}, layer {RANK[part]}) imports " + \
        ", ".join(f"{o} (layer {RANK[o]})" for o in sorted(upward))


@pytest.mark.parametrize("path", sorted((QAT / "format").glob("*.py")), ids=lambda p: p.name)
def test_the_format_depends_on_torch_alone(path):
    """The integer format (grid, packing, reference math, config schema) that quant, kernels and
    export share imports no other part of qat and nothing but torch and the standard library."""
    import sys

    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module if node.module.startswith("qat.") else node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            roots |= {a.name if a.name.startswith("qat.") else a.name.split(".")[0]
                      for a in node.names}
    foreign = {r for r in roots if r.startswith("qat") and not r.startswith("qat.format")} | {
        r for r in roots if not r.startswith("qat") and r != "torch"
        and r not in sys.stdlib_module_names and r != "__future__"}
    assert not foreign, f"qat/format/{path.name} imports {sorted(foreign)}"


def test_a_cycle_would_be_caught(tmp_path):
    """The check itself: an import of a higher layer from a lower one is reported."""
    module = tmp_path / "grid.py"
    module.write_text("def f():\n    from qat.kernels import native\n    from qat import lightning\n")
    assert qat_imports(module) == {"kernels", "lightning"}
    assert RANK["kernels"] >= RANK["quant"] and RANK["lightning"] > RANK["quant"]
