"""benchmarks/convergence.py: the --quick smoke run prints the table for all three setups, and the
table reports per-seed ratios with their spread, or the official's failure."""
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
convergence = pytest.importorskip("convergence")


def test_quick_run_prints_a_row_per_setup():
    pytest.importorskip("transformers")
    pytest.importorskip("adam_mini")
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "convergence.py"),
                           "--quick"], capture_output=True, text=True, cwd=REPO,
                          timeout=600)  # a hang guard; the run takes ~15 s on 2 cores
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "x 1 |" in line]
    assert [row.split(" | ")[0] for row in rows] == [
        f"| {convergence.TITLES[s]}" for s in convergence.SETUPS]
    for row in rows:
        _, _, adamw, ours, official = row.strip("| ").split(" | ")
        assert 0 < float(adamw) < 10
        assert re.fullmatch(r"\d\.\d{3}x", ours) and re.fullmatch(r"\d\.\d{3}x", official)


def test_table_gives_spread_over_seeds_and_failures():
    budget = convergence.Budget(demo_steps=10, steps=5, seeds=(0, 1))
    results = {"nanogpt": {"adamw": {0: 2.0, 1: 4.0},
                           "adam_mini": {0: 2.2, 1: 4.0},
                           "official": {0: "fails: IndexError: too many indices", 1: 3.0}}}
    row = convergence.table(results, budget).splitlines()[-1]
    assert row == (f"| {convergence.TITLES['nanogpt']} | 5 x 2 | 3.000 (2.000-4.000) | "
                   f"1.050x (1.000-1.100) | fails: IndexError: too many indices |")
