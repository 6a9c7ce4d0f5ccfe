"""`pid-fast distill`'s CPU threads: --threads, else the resumed run's count, else OMP_NUM_THREADS,
else timed on the student (pid_fast.train.threads.choose_threads)."""

import os

import pytest
import torch
from click.testing import CliRunner

from pid_fast.cli import main
from pid_fast.train.checkpoint import list_checkpoints, read_checkpoint
from pid_fast.train.threads import choose_threads, pick_threads_for_config, recorded_threads
from pid_fast.train import resolve_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distill_threads_option(tmp_path, config_file, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "set_num_threads", lambda n, real=torch.set_num_threads: (seen.append(n), real(n)))
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=1), "--run-dir",
                                    str(tmp_path / "run"), "--threads", "2"])
    assert res.exit_code == 0, res.output
    assert "CPU threads: 2 (--threads)" in res.output  # given, not timed
    assert seen[0] == 2
    assert torch.get_num_threads() == 1  # restored after the run (the fixture set 1)
    res = CliRunner().invoke(main, ["distill", "--config", config_file(), "--run-dir", str(tmp_path / "r"),
                                    "--threads", "0"])
    assert res.exit_code != 0 and "--threads" in res.output


def test_distill_picks_threads_on_the_cpu(tmp_path, config_file, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
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


def _fake_pick(monkeypatch, threads):
    calls = []

    def fake_pick(config):
        calls.append(threads)
        return threads, {1: 0.01, 2: 0.02}

    monkeypatch.setattr("pid_fast.train.threads.pick_threads_for_config", fake_pick)
    return calls


def test_resume_keeps_the_runs_thread_count(tmp_path, config_file, monkeypatch):
    """A resume whose timed pick would choose another count trains with the run's count; a
    --threads that differs from it is honoured with one warning."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run = str(tmp_path / "run")
    calls = _fake_pick(monkeypatch, 2)
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=2), "--run-dir", run])
    assert res.exit_code == 0, res.output
    assert calls == [2] and "CPU threads: 2 (timed" in res.output
    assert recorded_threads(run) == 2
    assert read_checkpoint(list_checkpoints(run)[0][1])["machine"] == {
        "device": "cpu", "precision": "fp32", "teacher_precision": None, "channels_last": False, "cpu_threads": 2,
        "world_size": 1, "cpu_capability": torch.backends.cpu.get_cpu_capability()}

    calls = _fake_pick(monkeypatch, 1)  # the machine got busy: the timed pick would now say 1
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=4), "--run-dir", run, "--resume"])
    assert res.exit_code == 0, res.output
    assert calls == [] and "CPU threads: 2 (the count of the resumed run" in res.output
    assert recorded_threads(run) == 2 and list_checkpoints(run)[0][0] == 4

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the resumed run's count wins over the variable too
    with pytest.warns(UserWarning, match="not the bitwise continuation") as caught:
        res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=6), "--run-dir", run,
                                        "--resume", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "CPU threads: 1 (--threads; the resumed run used 2" in res.output
    assert len([w for w in caught if "bitwise" in str(w.message)]) == 1
    assert recorded_threads(run) == 1  # from here on the run continues with 1


def test_omp_num_threads_pins_the_count(tmp_path, config_file, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    calls = _fake_pick(monkeypatch, 2)
    res = CliRunner().invoke(main, ["distill", "--config", config_file(total_steps=1), "--run-dir",
                                    str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    assert calls == [] and "CPU threads: 1 (OMP_NUM_THREADS=1)" in res.output


def test_choose_threads_order():
    def pick():
        raise AssertionError("timed although something else decided")

    assert choose_threads(3, None, {}, pick) == (3, "--threads")
    assert choose_threads(3, 3, {}, pick) == (3, "--threads")
    assert choose_threads(3, 2, {"OMP_NUM_THREADS": "1"}, pick)[0] == 3
    assert choose_threads(None, 2, {"OMP_NUM_THREADS": "1"}, pick)[0] == 2
    assert choose_threads(None, None, {"OMP_NUM_THREADS": "1"}, pick) == (torch.get_num_threads(), "OMP_NUM_THREADS=1")
    threads, why = choose_threads(None, None, {"OMP_NUM_THREADS": " "}, lambda: (2, {1: 0.5, 2: 0.25}))
    assert threads == 2 and why.startswith("timed") and "2 threads 250 ms" in why


def test_python_train_resume_uses_the_recorded_count(tmp_path, tiny_config):
    """pid_fast.train.train(resume=True) without threads trains with the checkpoint's count and
    leaves torch's own count as it was."""
    from pid_fast.train import train

    run = tmp_path / "run"
    train(tiny_config(total_steps=2), run, threads=2)
    assert torch.get_num_threads() == 1 and recorded_threads(run) == 2
    train(tiny_config(total_steps=4), run, resume=True)
    assert recorded_threads(run) == 2 and torch.get_num_threads() == 1
    with pytest.raises(ValueError, match="threads"):
        train(tiny_config(total_steps=4), run, threads=0)
