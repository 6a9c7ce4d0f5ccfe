"""The demo's teacher share: the scored weights blended with the initial (teacher's) weights."""

import pytest
import torch

from pid_fast.demo.run import _load_weights
from pid_fast.demo.teacher import load_digits_teacher
from pid_fast.train import list_checkpoints, load_student

from tests.demo.test_demo import _demo, tiny_files  # noqa: F401 (the module-scoped fixture)


def test_teacher_share_blends_the_scored_weights(tmp_path, tiny_files):  # noqa: F811
    s = _demo(tmp_path / "demo", tiny_files, steps=2, chunk=2, teacher_share=0.25)
    assert s["teacher_share"] == 0.25 and "25% teacher weights" in s["rows"]["student"]["label"]
    assert len(s["fd_over_training"]["model+teacher-0.25"]) == 1
    run = type("Run", (), {"teacher_path": tiny_files[0]})()
    path = dict(list_checkpoints(tmp_path / "demo" / "run"))[2]
    blended, _ = _load_weights(run, path, "model+teacher-0.25")
    raw, _ = load_student(path, weights="model")
    initial = load_digits_teacher(tiny_files[0]).model.state_dict()
    for name, value in blended.state_dict().items():
        torch.testing.assert_close(value, 0.75 * raw.state_dict()[name] + 0.25 * initial[name])
    with pytest.raises(ValueError, match="teacher_share"):
        _demo(tmp_path / "bad", tiny_files, teacher_share=1.0)
