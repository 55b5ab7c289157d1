"""Imports run one way: each part of qat imports only parts below it (function-local imports too).

The layers, bottom up: the integer format and the native C code have no qat dependencies but io;
data (corpora, tokens, the eval protocol) and models (structure, decoder blocks and their inputs,
loading, run checkpoints) below quant and kernels; the distillation losses and teacher; then the
stages, siblings that never import each other (PTQ, the block stage, pruning, export); serving;
evaluation (which reads exports and generates through serve); Lightning, the end-to-end stage; `train(cfg)` and the commands
on top, `qat-footprint` above them (it reads a recipe as train.py does). A new upward or sideways import (a cycle in waiting) fails here with the module that made it.
"""
import ast
from pathlib import Path

import pytest

QAT = Path(__file__).resolve().parents[1] / "qat"

LAYERS = [
    {"io"},
    {"assets", "format"},
    {"native", "data", "models"},
    {"quant", "kernels"},
    {"distill"},
    {"ptq", "blockwise", "prune", "export"},  # the stages: siblings
    {"serve"},  # serving an export: its loader, the decode loop
    {"eval"},  # evaluation reads exports and generates through serve (the harness's tasks)
    {"lightning"},
    {"train", "report", "__init__", "conf"},
    {"footprint"},  # a run's footprint reads the recipe as train.py would (train.specs, streamed)
]
STAGES = {"ptq", "blockwise", "prune", "export", "eval", "quant", "distill"}
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
    """Strictly down: a part never imports one of its own layer (siblings) or above."""
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


FORBIDDEN = [  # (importer, imported): the rules the layering above must keep, stated plainly
    *((stage, "lightning") for stage in sorted(STAGES)),  # stages run without the Trainer
    ("blockwise", "ptq"), ("ptq", "blockwise"),
    ("models", "quant"),  # what stages share about a model knows nothing of fake quantization
    ("lightning", "kernels"),  # the end-to-end stage trains; serving kernels are export's
]


@pytest.mark.parametrize("importer,imported", FORBIDDEN, ids=lambda v: str(v))
def test_forbidden_imports(importer, imported):
    found = [str(p.relative_to(QAT)) for p in SOURCES
             if part_of(p) == importer and imported in qat_imports(p)]
    assert not found, f"{importer} imports {imported}: {found}"
    assert importer in RANK and imported in RANK  # a renamed part must not pass by vanishing


def test_stages_import_no_lightning_at_all():
    """Not even the lightning package itself: a stage is a function of plain tensors."""
    found = []
    for path in SOURCES:
        if part_of(path) not in STAGES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n.split(".")[0] in ("lightning", "pytorch_lightning") for n in names):
                found.append(str(path.relative_to(QAT)))
    assert not found, f"stages importing Lightning: {sorted(set(found))}"


def test_fake_quantization_and_experts_import_with_torch_alone():
    """The GPU machine's benches (bench/gpu_qat_overhead.py, bench/moe_experts.py) run where
    only torch is installed: qat.quant and qat.models.experts import nothing else."""
    import subprocess
    import sys

    blocker = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guarded(name, *args, **kwargs):\n"
        "    if name.split('.')[0] in ('transformers', 'safetensors', 'hydra', 'omegaconf',\n"
        "                              'lightning', 'datasets'):\n"
        "        raise ImportError('not on the GPU machine: ' + name)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = guarded\n"
        "import qat.quant, qat.models.experts\n")
    result = subprocess.run([sys.executable, "-c", blocker], capture_output=True, text=True,
                            cwd=QAT.parent)
    assert result.returncode == 0, result.stderr[-2000:]
