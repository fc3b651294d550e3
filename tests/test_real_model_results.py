"""Lesson 11 plots the budget curve of SmolLM2-135M at the converter's defaults from the files ``benchmarks/real_model.py``
wrote, since those conversions take minutes each.  This test runs that benchmark again at one cell — ``transmla`` at
12.5%, the quickest conversion at the defaults (about 1.5 minutes on a 2-core CPU) — and checks the shipped file's
figures for it and for the source against the fresh ones."""

from pathlib import Path

import pytest
import torch

from mla_ref.pipelines.fetch import default_fetch_problem
from mla_ref.results import perplexity_rows, results_file

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.skipif(
    default_fetch_problem("smollm2-135m") is not None, reason="SmolLM2-135M is not fetched here (make models)"
)
def test_the_budget_curve_file_reproduces_at_one_budget(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import real_model  # benchmarks/real_model.py, the command named in the results file

    out = tmp_path / "one_cell.md"
    threads = str(torch.get_num_threads())  # the benchmark sets torch's threads: leave them as the tests have them
    argv = ["--methods", "transmla", "--budgets", "0.125", "--no-samples", "--threads", threads, "--out", str(out)]
    assert real_model.main(argv) == 0
    fresh = {(row["method"], row["fraction"]): row for row in perplexity_rows(out)}
    shipped = {(row["method"], row["fraction"]): row for row in perplexity_rows(results_file("real_model.md"))}
    assert set(fresh) == {("source", 1.0), ("transmla", 0.125)}
    for cell in fresh:
        for text in ("code", "prose"):
            # the same command on another CPU rounds differently; the file prints three decimals
            assert fresh[cell][text] == pytest.approx(shipped[cell][text], rel=5e-3), (cell, text)
