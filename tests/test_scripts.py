"""The benchmark scripts' own arithmetic: what they print is what the README quotes as measured."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def _script(name: str):
    sys.path.insert(0, str(SCRIPTS))  # bench_small imports subsets.py from beside it
    try:
        spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def test_a_gpu_case_that_failed_is_never_called_met():
    """Review: a case that failed within its time target said "met" (its wall time was the time
    to the failure)."""
    bench = _script("bench_gpu")
    failed = bench.Case("explain", "explain", [], 120, target_s=15,
                        row={"wall_s": 8.0, "failed": True, "note": "FAILED (1): error: ..."})
    measured = bench.Case("explain", "explain", [], 120, target_s=15, row={"wall_s": 8.0})
    assert bench.verdict(failed) == "FAILED" and bench.verdict(measured) == "met"


def _result(seed, accuracy, recipe="reference", epochs=100):
    return {"set": "gray2", "recipe": recipe, "seed": seed, "accuracy": accuracy, "auc": accuracy, "seconds": 60.0,
            "reference_epochs": epochs, "best_epoch": 3, "outside_steps": 0.1, "select": {}}


def test_small_data_tables_use_one_row_a_seed_the_sample_std_and_say_a_short_reference(capsys):
    """Review: a seed recorded twice (two sittings that overlapped) counted twice in the table
    but once in the verdict; the spread was the population std (18 % below aggregate's sample
    std with 3 seeds); the Markdown table called a 1-epoch reference "reference"."""
    bench = _script("bench_small")
    results = [_result(0, 0.5), _result(1, 0.6), _result(2, 0.9), _result(0, 0.7)]  # seed 0 again, later
    rows = bench.rows_of(results, "gray2", "reference", 100)
    assert [(r["seed"], r["accuracy"]) for r in rows] == [(0, 0.7), (1, 0.6), (2, 0.9)]
    bench.markdown(results, ["gray2"], 100)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| gray2"))
    assert f"73.3% ± {np.std([0.7, 0.6, 0.9], ddof=1) * 100:.1f}" in line and "| 0,1,2 |" in line
    bench.markdown([_result(0, 0.5, epochs=1)], ["gray2"], 1)
    assert "reference, 1 epochs (NOT the published 100)" in capsys.readouterr().out


@pytest.mark.parametrize("values, expected", [([0.5], 0.0), ([0.7, 0.6, 0.9], np.std([0.7, 0.6, 0.9], ddof=1))])
def test_the_seed_spread_is_the_sample_std(values, expected):
    assert _script("bench_small").std(values) == pytest.approx(expected)


def test_small_data_tables_keep_earlier_defaults_apart_and_say_which(capsys):
    """The data order and augmentation streams changed on 2026-12-01: medcli runs from before
    (no "streams" in their result) are shown and judged as such, never as today's defaults,
    and a set re-run with today's defaults shows those alone."""
    bench = _script("bench_small")
    old = [{**_result(seed, 0.9), "recipe": "medcli", "select": {}} for seed in (0, 1)]
    new = [{**_result(0, 0.95), "recipe": "medcli", "select": {}, "streams": bench.STREAMS}]
    reference = [_result(0, 0.5), _result(1, 0.6)]
    assert [bench.recipe_of(r) for r in (*old, *new)] == ["medcli-before-streams"] * 2 + ["medcli"]
    bench.markdown([*reference, *old], ["gray2"], 100)
    out = capsys.readouterr().out
    assert "| gray2 | medcli defaults before the streams were seeded apart | 0,1 |" in out
    assert "medcli (before the streams were seeded apart) - reference on seeds 0,1" in out
    bench.markdown([*reference, *old, *new], ["gray2"], 100)
    out = capsys.readouterr().out
    assert "| gray2 | medcli defaults | 0 | 95.0%" in out and "before the streams" not in out
    # review: one seed's spread is 0, and "mean gap > spread 0.0000: yes" read as a verdict
    assert "(every seed: yes; no spread of one seed: not judged yet)" in out and "spread 0.0000" not in out
