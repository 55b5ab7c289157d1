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
