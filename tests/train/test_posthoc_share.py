"""Weights blended with the run's initial weights after training (pid_fast.train.teacher_share,
`pid-fast teacher-share`)."""

import pytest
import torch
from click.testing import CliRunner

from pid_fast.cli import main
from pid_fast.train import list_checkpoints, load_student, train
from pid_fast.train.builders import build_teacher
from pid_fast.train.teacher_share import blend_with_initial, initial_weights, write_teacher_shares

pytestmark = pytest.mark.usefixtures("one_thread")

NET = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": []}


def _run(tmp_path, init):
    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": init, "network": None if init == "teacher" else NET, "seed": 1}, "batch_size": 4,
           "total_steps": 3, "log_every": 3, "checkpoint_every": 3, "snapshot_every": 0, "progress": False,
           "ema_rates": [0.9], "optimizer": {"lr": 1e-2}}
    train(cfg, tmp_path / init)
    return dict(list_checkpoints(tmp_path / init))[3]


@pytest.mark.parametrize("init", ["teacher", "random"])
def test_blends_with_the_runs_initial_weights(tmp_path, init):
    path = _run(tmp_path, init)
    state = torch.load(path, weights_only=True)
    initial = initial_weights(state["config"])
    if init == "teacher":  # PID: the initial weights are the teacher's network
        teacher, _ = build_teacher(state["config"]["teacher"], torch.device("cpu"))
        for name, value in teacher.model.state_dict().items():
            assert torch.equal(initial[name], value)
    moved = [n for n, v in state["model"].items() if v.is_floating_point() and not torch.equal(v, initial[n])]
    assert moved  # training changed the weights, so the blend below is not trivially equal
    paths = write_teacher_shares(path, [0.0, 0.25], tmp_path / "out", weights="ema-0.9")
    assert [p.endswith("checkpoint-000000003.pt") for p in paths] == [True, True] and "share-0.2500" in paths[1]
    unblended, _ = load_student(paths[0])
    blended, meta = load_student(paths[1])
    assert meta["step"] == 3
    for name, value in blended.state_dict().items():
        trained = state["ema"]["0.9"][name]
        assert torch.equal(unblended.state_dict()[name], trained)
        torch.testing.assert_close(value, 0.75 * trained + 0.25 * initial[name])


def test_bad_shares_and_mismatched_weights_are_refused(tmp_path):
    path = _run(tmp_path, "teacher")
    for bad in (1.0, -0.1, True, "0.2"):
        with pytest.raises(ValueError, match="share must be a number in"):
            write_teacher_shares(path, [bad], tmp_path / "out")
    with pytest.raises(ValueError, match="keys differ"):
        blend_with_initial({"a": torch.zeros(1)}, {"b": torch.zeros(1)}, 0.1)
    result = CliRunner().invoke(main, ["teacher-share", str(tmp_path / "teacher"), str(tmp_path / "cli"),
                                       "--share", "0.2"])
    assert result.exit_code == 0, result.output
    assert "1 blended checkpoint(s)" in result.output and (tmp_path / "cli" / "share-0.2000").is_dir()
    result = CliRunner().invoke(main, ["teacher-share", path, str(tmp_path / "cli"), "--share", "1.5"])
    assert result.exit_code != 0 and "share must be a number in [0, 1)" in result.output
