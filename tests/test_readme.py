"""The README's map for newcomers holds: each concept's file exists and defines what it names."""
import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ROW = re.compile(r"^\| (?P<concept>[^|]+?) \| `(?P<file>[^`]+)` \| `(?P<name>[^`]+)` \|$")


def concept_rows() -> list[tuple[str, str, str]]:
    text = (ROOT / "README.md").read_text()
    table = text.split("Where each concept lives", 1)[1].split("\n\n", 2)[1]
    return [(m["concept"], m["file"], m["name"]) for line in table.splitlines()
            if (m := ROW.match(line))]


def test_the_map_names_every_concept():
    concepts = {c for c, _, _ in concept_rows()}
    assert concepts == {"fake quantization", "the block stage", "a KD loss", "a pruning schedule",
                        "the export writer", "the kernels", "the Hydra config", "`train`"}


@pytest.mark.parametrize("concept,file,name", concept_rows())
def test_the_file_holds_the_concept(concept, file, name):
    path = ROOT / file
    assert path.is_file(), f"{concept}: {file} does not exist"
    if path.suffix == ".py":
        defined = {n.name for n in ast.parse(path.read_text()).body
                   if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    else:
        defined = set(yaml.safe_load(path.read_text()))
    assert name in defined, f"{concept}: {file} does not define {name}"
