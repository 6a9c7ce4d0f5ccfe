"""`pid-fast distill --threads`: set as given; unset on the CPU, timed on the student."""

import os

import pytest
import torch
from click.testing import CliRunner

from pid_fast.cli import main
from pid_fast.train.threads import pick_threads_for_config
from pid_fast.train import resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distill_threads_option(tmp_path, config_file, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, real=torch.set_num_threads: (seen.append(n), real(n)))
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=1), "--run-dir",
                                    str(tmp_path / "run"), "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "CPU threads" not in res.output  # given, not timed
    assert seen[0] == 2
    assert torch.get_num_threads() == 1  # restored after the run (the fixture set 1)
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", str(tmp_path / "r"),
                                    "--threads", "0"])
    assert res.exit_code != 0 and "--threads" in res.output


def test_distill_picks_threads_on_the_cpu(tmp_path, config_file, monkeypatch):
    calls = []

    def fake_pick(config):
        calls.append(config)
        return 1, {1: 0.002, 2: 0.05}

    monkeypatch.setattr("pid_fast.train.threads.pick_threads_for_config", fake_pick)
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=1), "--run-dir",
                                    str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert "CPU threads: 1 (" in res.output and "2 threads 50 ms" in res.output
    assert len(calls) == 1 and calls[0]["batch_size"] == 4  # the resolved config


def test_pick_threads_for_config_times_the_student(tiny_config):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rng = torch.get_rng_state()
    threads, timings = pick_threads_for_config(resolve_config(tiny_config()))
    assert set(timings) == {1, cores} and threads in timings
    assert all(t > 0 for t in timings.values())
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is untouched
    assert torch.get_num_threads() == 1
    with pytest.raises(FileNotFoundError, match="teacher.path"):
        pick_threads_for_config(resolve_config(tiny_config(teacher={"kind": "edm", "path": "absent.safetensors"},
                                                           student={"init": "teacher"})))
