"""Derived text matches its inputs: BENCHMARKS.md's goals section is what bench/goals.py computes
from bench/results/*.json now (regenerate with `python bench/goals.py`)."""
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import goals  # noqa: E402
from common import section  # noqa: E402


def test_goals_section_matches_the_result_files():
    written = section("goals")
    assert written is not None, "BENCHMARKS.md has no goals section: run python bench/goals.py"
    assert written == goals.goals_section(goals.goals()).strip(), \
        "BENCHMARKS.md's goals section is stale: run python bench/goals.py"


def test_a_stale_number_would_be_caught():
    rows = goals.goals()
    fresh = goals.goals_section(rows)
    decode = next(r for r in rows if r["goal"] == "Decode")
    decode["measured"] = decode["measured"].replace(decode["measured"].split()[0], "62.8", 1)
    assert goals.goals_section(rows) != fresh


def test_a_recipe_row_meets_its_bar_only_within_it_and_measured_alone():
    row = {"name": "recipe_w4g64", "ppl": 13.9, "fp_ppl": 13.586, "shakespeare_ppl": 30.0,
           "fp_shakespeare_ppl": 27.989, "val_ppl": 20.0, "fp_val_ppl": 19.0, "seconds": 1500,
           "load_average": [0.1, 1.2]}
    w4 = lambda rows: next(g for g in goals.recipe_goals(rows) if g["goal"] == "recipe W4 g64")  # noqa: E731
    assert w4([row])["met"] is True  # 1.023x, Shakespeare 1.072x, 25 min alone
    assert w4([dict(row, shakespeare_ppl=31.0)])["met"] is False  # Shakespeare 1.108x
    assert w4([dict(row, ppl=14.1)])["met"] is False  # 1.038x
    assert w4([dict(row, load_average=[2.9, 3.1])])["met"] is False  # ran beside something
    assert w4([dict(row, seconds=3700)])["met"] is False
    assert w4([])["met"] is None
