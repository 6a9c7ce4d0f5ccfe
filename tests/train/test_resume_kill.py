"""Exact resume with the default options: `pid-fast distill --resume` killed with SIGKILL at random
moments, on a loaded machine, ends with the weights of the run it continues, bit for bit.

The thread count is part of a run's numbers (CPU kernels reduce over their threads), so the
uninterrupted reference run uses the count the killed run chose at its first start (the timed
pick, recorded in its checkpoints); every resume must keep it although the timed pick, redone
under load, could choose another (pid_fast.train.threads).
"""

import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from pid_fast.train.checkpoint import list_checkpoints, read_checkpoint
from pid_fast.train.threads import recorded_threads

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL_STEPS = 60
SETTINGS = ["--set", f"total_steps={TOTAL_STEPS}", "--set", "checkpoint_every=3", "--set", "log_every=3",
            "--set", "snapshot_every=0", "--set", "keep_checkpoints=0", "--no-progress"]


def _distill(run_dir, *extra):
    return [sys.executable, "-m", "pid_fast.cli", "distill", "--config", os.path.join(ROOT, "configs", "tiny-cpu.json"),
            "--run-dir", str(run_dir), "--resume", *SETTINGS, *extra]


def _default_env():
    env = dict(os.environ)
    env.pop("OMP_NUM_THREADS", None)  # the default options: nothing pins the thread count
    return env


def _wait_for_new_checkpoint(proc, run_dir, known, timeout=120.0):
    """Poll until a checkpoint newer than ``known`` exists (or the process ended)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        steps = [s for s, _ in list_checkpoints(run_dir)]
        if steps and max(steps) > known:
            return max(steps)
        time.sleep(0.02)
    return known


def _state_tensors(path):
    state = read_checkpoint(path)
    tensors = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            tensors[prefix] = value
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for k, v in enumerate(value):
                walk(f"{prefix}.{k}", v)

    for key in ("model", "ema", "optimizer"):
        walk(key, state[key])
    return tensors


def test_sigkill_resume_with_default_options_is_bitwise_exact(tmp_path):
    rng = random.Random(1234)
    killed_dir, reference_dir = tmp_path / "killed", tmp_path / "reference"
    # The first start runs on a quiet machine, every resume beside two busy processes: the timed
    # pick of the thread count (1 vs all cores) sees another machine than the run it resumes.
    load = []
    kills, resumed_from = 0, []
    try:
        known = 0
        while kills < 5:
            resumed_from.append(known)
            proc = subprocess.Popen(_distill(killed_dir), env=_default_env(), cwd=tmp_path,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            known = _wait_for_new_checkpoint(proc, killed_dir, known)
            time.sleep(rng.uniform(0.0, 0.3))  # mid-step, mid-checkpoint write, ...
            if proc.poll() is not None:
                break  # finished before the kill
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            known = max([s for s, _ in list_checkpoints(killed_dir)], default=0)
            if not load:
                load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
        final = subprocess.run(_distill(killed_dir), env=_default_env(), cwd=tmp_path, capture_output=True,
                               text=True, timeout=300)
    finally:
        for busy in load:
            busy.kill()
            busy.wait()
    assert final.returncode == 0, final.stderr
    assert kills >= 3 and sum(step > 0 for step in resumed_from) >= 2, (kills, resumed_from)
    assert "resumed run, recorded in its checkpoint" in final.stdout
    assert "bitwise" not in final.stderr  # no thread-count warning with the default options

    # Every checkpoint of the killed run trained with the count its first start chose.
    threads = recorded_threads(killed_dir)
    assert threads is not None
    counts = {read_checkpoint(path)["machine"]["cpu_threads"] for _, path in list_checkpoints(killed_dir)}
    assert counts == {threads}

    reference = subprocess.run(_distill(reference_dir, "--threads", str(threads)), env=_default_env(), cwd=tmp_path,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr
    (step_a, path_a), (step_b, path_b) = list_checkpoints(killed_dir)[0], list_checkpoints(reference_dir)[0]
    assert step_a == step_b == TOTAL_STEPS
    resumed, uninterrupted = _state_tensors(path_a), _state_tensors(path_b)
    assert resumed.keys() == uninterrupted.keys() and len(resumed) > 10
    differing = [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])]
    assert differing == []


def test_resume_on_another_machine_warns_and_keeps_the_recorded_modes(tmp_path, monkeypatch):
    """What a start decides from the machine ('auto' precision settings) is taken from the
    checkpoint on resume; another device, process count or CPU instruction set warns once."""
    from pid_fast.train import train
    from pid_fast.train.checkpoint import atomic_save

    config = {"device": "cpu", "teacher": {"kind": "gaussian", "std": 0.5}, "batch_size": 4, "total_steps": 2,
              "checkpoint_every": 2, "snapshot_every": 0, "progress": False,
              "student": {"init": "random", "network": {"name": "tiny-ddpmpp", "img_resolution": 8, "in_channels": 1,
                                                        "out_channels": 1, "model_channels": 8, "channel_mult": [1],
                                                        "attn_resolutions": []}}}
    run = tmp_path / "run"
    train(config, run, threads=1)
    path = list_checkpoints(run)[0][1]
    state = read_checkpoint(path)
    state["machine"].update(cpu_capability="AVX512-elsewhere", precision="bf16-mixed")
    atomic_save(state, path)
    with pytest.warns(UserWarning, match=r"another machine \(cpu_capability 'AVX512-elsewhere' -> ") as caught:
        train(dict(config, total_steps=4), run, resume=True)
    assert len([w for w in caught if "bitwise" in str(w.message)]) == 1
    machine = read_checkpoint(list_checkpoints(run)[0][1])["machine"]
    assert machine["precision"] == "bf16-mixed"  # precision 'auto' resolved as the run did
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
