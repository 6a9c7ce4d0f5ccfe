"""benchmarks/convergence_report.py: the numbers the convergence tables derive (steps to the
distance-to-teacher target and to the FD-to-data target, held-out ratios against the teacher's FD
on the same seeds)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
report = pytest.importorskip("convergence_report")


def _results():
    teacher = {"10000": {"fd": 1.0}, "20000": {"fd": 2.0}}
    digits = {"fd": {"model": {"100": 3.0, "200": 1.04, "300": 1.2}},
              "fd_teacher": {"model": {"100": 2.0, "200": 0.15, "300": 0.14}},
              "rmse_teacher": {"model": {"100": 0.3, "200": 0.145, "300": 0.139}},
              "heldout": {"step": 300, "scores": {"model": {"10000": {"fd": 1.2, "fd_teacher": 0.14, "rmse_teacher": 0.139},
                                                            "20000": {"fd": 2.2, "fd_teacher": 0.16,
                                                                      "rmse_teacher": 0.141}}}}}
    return {"num_samples": 10, "teacher": teacher, "commands": ["cmd"],
            "recipes": {"r": {"description": "d", "steps": 300, "gm": {"rmse": {"model": {"200": 0.5}}}, "digits": digits}}}


def test_steps_to_target_is_the_first_step_within_the_ratio():
    assert report.steps_to_target({"100": 3.0, "200": 1.04, "300": 1.0}, 1.0) == 200
    assert report.steps_to_target({"100": 3.0}, 1.0) is None
    assert report.steps_to_target({"300": 1.0, "100": 1.01}, 1.0) == 100  # in step order, not key order


def test_steps_to_teacher_needs_both_the_fd_and_the_rmse():
    fd, rmse = {"100": 0.5, "200": 0.15, "300": 0.14}, {"100": 0.2, "200": 0.145, "300": 0.139}
    assert report.steps_to_teacher(fd, rmse) == 300  # at 200 the FD is within 0.16, the RMSE not within 0.140
    assert report.steps_to_teacher(fd, {"100": 0.1}) is None  # no RMSE where the FD is reached
    assert report.steps_to_teacher({"300": 0.1, "100": 0.1}, {"300": 0.1, "100": 0.1}) == 100  # step order


def test_tables_lead_with_the_distance_to_the_teacher():
    text = report.table(_results(), notes="a note")
    row = next(line for line in text.splitlines() if line.startswith("| r | model | 300 |"))
    cells = [c.strip() for c in row.split("|")[1:-1]]
    # steps to target, FD to teacher @100/@200/@300, RMSE @last, FD to data @last, steps to 1.05x data FD
    assert cells[2:9] == ["300", "2.000", "0.150", "0.140", "0.139", "1.200", "200"]
    header = next(line for line in text.splitlines() if line.startswith("| recipe | weights | steps to target"))
    assert header.index("FD to teacher @100") < header.index("FD to data @last")
    held = next(line for line in text.splitlines() if line.startswith("| r | model | 300 | 0.140"))
    assert "0.140 / 0.1390 / 1.200 (1.200x) (a)" in held and "0.160 / 0.1410 / 2.200 (1.100x) |" in held
    # the means are over the held-out sets only: the curves' seeds (the selection set) are left out
    assert "**0.160**" in held and "| 0.1410 |" in held and "1.100x" in held
    assert "a note" in text and "    cmd" in text
