"""benchmarks/convergence_report.py: the numbers the convergence tables derive (steps to the
target, held-out ratios against the teacher's FD on the same seeds)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
report = pytest.importorskip("convergence_report")


def _results():
    teacher = {"10000": {"fd": 1.0}, "20000": {"fd": 2.0}}
    digits = {"fd": {"model": {"100": 3.0, "200": 1.04, "300": 1.2}},
              "fd_teacher": {"model": {"100": 2.0, "200": 0.5, "300": 0.4}},
              "heldout": {"step": 300, "scores": {"model": {"10000": {"fd": 1.2, "fd_teacher": 0.4},
                                                            "20000": {"fd": 2.2, "fd_teacher": 0.6}}}}}
    return {"num_samples": 10, "teacher": teacher, "commands": ["cmd"],
            "recipes": {"r": {"description": "d", "steps": 300, "gm": {"rmse": {"model": {"200": 0.5}}}, "digits": digits}}}


def test_steps_to_target_is_the_first_step_within_the_ratio():
    assert report.steps_to_target({"100": 3.0, "200": 1.04, "300": 1.0}, 1.0) == 200
    assert report.steps_to_target({"100": 3.0}, 1.0) is None
    assert report.steps_to_target({"300": 1.0, "100": 1.01}, 1.0) == 100  # in step order, not key order


def test_tables_use_the_first_seed_set_and_same_seed_ratios():
    text = report.table(_results(), notes="a note")
    row = next(line for line in text.splitlines() if line.startswith("| r | model | 200 |"))
    assert "0.400" in row  # FD to teacher at the last scored step (300)
    held = next(line for line in text.splitlines() if line.startswith("| r | model | 300 |"))
    assert "1.200 (1.200x)" in held and "2.200 (1.100x)" in held and "**1.150x**" in held and "0.500" in held
    assert "a note" in text and "    cmd" in text
