"""A user error (missing file, bad config, bad override, missing run folder) ends a command
with one `Error: ...` line, never a Python traceback."""

import json

import pytest
from click.testing import CliRunner

from pid_fast.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _error(result, *needles):
    assert result.exit_code != 0
    assert "Traceback" not in result.output, result.output
    assert "Error:" in result.output, result.output
    for needle in needles:
        assert needle in result.output, result.output


def _edm_teacher_config(tmp_path, path):
    cfg = {"device": "cpu", "teacher": {"kind": "edm", "path": str(path)}, "batch_size": 4, "total_steps": 1,
           "snapshot_every": 0, "progress": False}
    (tmp_path / "edm.json").write_text(json.dumps(cfg))
    return str(tmp_path / "edm.json")


@pytest.mark.parametrize("threads", [None, "1"])  # the thread timing builds the teacher first; --threads skips it
def test_distill_missing_teacher_file(tmp_path, threads):
    config = _edm_teacher_config(tmp_path, tmp_path / "absent.safetensors")
    args = ["distill", "--config", config, "--run-dir", str(tmp_path / "run")]
    res = CliRunner().invoke(main, args + (["--threads", threads] if threads else []))
    _error(res, "teacher.path", "absent.safetensors")


def test_distill_unreadable_teacher_file(tmp_path):
    bad = tmp_path / "teacher.safetensors"
    bad.write_bytes(b"not a safetensors file")
    res = CliRunner().invoke(main, ["distill", "--config", _edm_teacher_config(tmp_path, bad),
                                    "--run-dir", str(tmp_path / "run"), "--threads", "1"])
    _error(res, "teacher.safetensors")


def test_distill_config_errors(tmp_path, config_file):
    run = str(tmp_path / "run")
    res = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "absent.json"), "--run-dir", run])
    _error(res, "absent.json", "does not exist")
    (tmp_path / "broken.json").write_text("{not json")
    res = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "broken.json"), "--run-dir", run])
    _error(res, "not valid JSON")
    (tmp_path / "list.json").write_text("[1, 2]")
    res = CliRunner().invoke(main, ["distill", "--config", str(tmp_path / "list.json"), "--run-dir", run])
    _error(res, "mapping")
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", run, "--set", "optimizer.lr"])
    _error(res, "key=value")
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", run, "--set", "batch_size=-3"])
    _error(res, "batch_size")
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", run, "--set", "nope=1"])
    _error(res, "nope")


def test_distill_resume_with_another_config(tmp_path, config_file, tiny_run):
    res = CliRunner().invoke(main, ["distill", "--config", config_file(seed=5), "--run-dir", str(tiny_run),
                                    "--resume", "--threads", "1"])
    _error(res, "cannot resume")


def test_sample_and_fid_missing_or_empty_run_folder(tmp_path):
    absent = str(tmp_path / "absent")
    res = CliRunner().invoke(main, ["sample", absent, str(tmp_path / "s.npz")])
    _error(res, "does not exist")
    res = CliRunner().invoke(main, ["fid", absent, "--features", "digits"])
    _error(res, "does not exist")
    (tmp_path / "empty").mkdir()
    res = CliRunner().invoke(main, ["sample", str(tmp_path / "empty"), str(tmp_path / "s.npz")])
    _error(res, "checkpoint")
    res = CliRunner().invoke(main, ["fid", str(tmp_path / "empty"), "--features", "digits", "--all-checkpoints"])
    _error(res, "--all-checkpoints", "not a run folder")


def test_sample_damaged_checkpoint(tmp_path):
    bad = tmp_path / "checkpoint-000000002.pt"
    bad.write_bytes(b"\x00" * 64)
    res = CliRunner().invoke(main, ["sample", str(bad), str(tmp_path / "s.npz")])
    _error(res, "checkpoint-000000002.pt")


def test_sample_bad_weights(tmp_path, tiny_run):
    res = CliRunner().invoke(main, ["sample", str(tiny_run), str(tmp_path / "s.npz"), "--weights", "ema-0.3"])
    _error(res, "no EMA with rate")
    res = CliRunner().invoke(main, ["sample", str(tiny_run), str(tmp_path / "s.npz"), "--weights", "best"])
    _error(res, "weights")
