"""parallel 'fsdp' (FSDP2 with sharded DCP checkpoints): equality with DDP and with the
single-process trainer, exact kill/resume, the consolidated weights for sample / fid / export."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pid_fast.train import apply_overrides, list_checkpoints, load_latest_checkpoint, resolve_config, train
from pid_fast.train.launch import train_local_runs
from pid_fast.train.checkpoint import FINISHED_MARKER, read_checkpoint
from pid_fast.train.sharded_checkpoint import read_sharded_meta
from pid_fast.train.sharding import fsdp_units

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_training import NET, ROOT, assert_same_state, tiny_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _losses(run_dir):
    return [json.loads(line)["loss"] for line in open(os.path.join(run_dir, "log.jsonl")) if '"loss"' in line]


def _max_diff(a, b):
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _state(run_dir):
    return load_latest_checkpoint(run_dir)[1]  # a sharded folder: consolidated full weights


def test_units_and_config_errors():
    from pid_fast.models.networks import build_network, network_config

    net = build_network(network_config(**NET))
    units = fsdp_units(net)
    assert len(units) == len(net.enc) + len(net.dec) and all(any(True for _ in u.parameters()) for u in units)
    for bad, key in [({"parallel": "zero"}, "parallel"), ({"teacher_sharding": True}, "teacher_sharding"),
                     ({"parallel": "fsdp", "teacher_sharding": "yes"}, "teacher_sharding"),
                     ({"parallel": "fsdp", "loss": {"derivative": "jvp"}}, "loss.derivative"),
                     ({"parallel": "fsdp", "compile": True}, "compile"),
                     ({"log": {"tensorboard": "yes"}}, "log.tensorboard"), ({"log": {"wandb_project": ""}},
                                                                               "log.wandb_project")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            resolve_config(bad)
    assert resolve_config({"parallel": "fsdp"})["teacher_sharding"] is None
    # a run from before these keys resumes as ddp; a ddp run does not resume as fsdp
    from pid_fast.train.config import check_resume_config

    now = resolve_config({})
    old = {k: v for k, v in now.items() if k not in ("parallel", "teacher_sharding", "log")}
    assert check_resume_config(old, now)["parallel"] == "ddp"
    with pytest.raises(ValueError, match="parallel"):
        check_resume_config(old, resolve_config({"parallel": "fsdp"}))


def test_fsdp_one_process_equals_the_single_process_trainer(tmp_path):
    """fsdp in one process (a process group of one) = the plain trainer: accumulation, clipping,
    EMAs, a class-conditional teacher."""
    cfg = tiny_config(**{"batch_size": 8, "accum": 2, "total_steps": 4, "checkpoint_every": 4, "log_every": 1,
                         "clip_grad_norm": 0.5, "student.init": "teacher", "student.network": None})
    train(cfg, tmp_path / "plain")
    train(apply_overrides(cfg, {"parallel": "fsdp"}), tmp_path / "fsdp")
    assert [s for s, _ in list_checkpoints(tmp_path / "fsdp")] == [4]
    assert list_checkpoints(tmp_path / "fsdp")[0][1].endswith(".dcp")
    a, b = _state(tmp_path / "plain"), _state(tmp_path / "fsdp")
    assert_same_state(a["model"], b["model"], exact=False)
    assert_same_state(a["ema"], b["ema"], exact=False)
    np.testing.assert_allclose(_losses(tmp_path / "fsdp"), _losses(tmp_path / "plain"), rtol=1e-6)
    assert b["machine"] == a["machine"] and b["student"] == a["student"]


def test_fsdp_two_processes_match_ddp_for_20_steps(tmp_path):
    """2 CPU processes (gloo), fp32, 2 accumulation rounds, 20 steps: fsdp (sharded teacher) and
    ddp give the same loss curve and final weights and EMAs."""
    cfg = tiny_config(**{"batch_size": 8, "accum": 2, "total_steps": 20, "checkpoint_every": 20, "log_every": 1,
                         "student.init": "teacher", "student.network": None, "precision": "fp32",
                         "log.tensorboard": True})  # (so both log the gradient norm; fsdp's is collective)
    fsdp = apply_overrides(cfg, {"parallel": "fsdp"})
    train_local_runs([(cfg, tmp_path / "ddp", False), (fsdp, tmp_path / "fsdp", False)], world_size=2)
    events = os.listdir(tmp_path / "fsdp" / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")  # rank 0 only
    la, lb = _losses(tmp_path / "ddp"), _losses(tmp_path / "fsdp")
    assert len(la) == len(lb) == 20
    np.testing.assert_allclose(lb, la, rtol=1e-5)
    a, b = _state(tmp_path / "ddp"), _state(tmp_path / "fsdp")
    assert b["world_size"] == 2 and len(b["rng"]) == 2
    assert_same_state(a["model"], b["model"], exact=False)
    assert_same_state(a["ema"], b["ema"], exact=False)
    difference = _max_diff(a["model"], b["model"])
    moved = _max_diff(a["model"], _state_after_zero_steps(cfg))  # how far 20 steps took the weights
    assert difference < 1e-6 and moved > 1e3 * difference
    norms = {mode: [json.loads(line)["grad_norm"] for line in open(tmp_path / mode / "log.jsonl")]
             for mode in ("ddp", "fsdp")}
    assert len(norms["fsdp"]) == 20 and all(n > 0 for n in norms["fsdp"])
    np.testing.assert_allclose(norms["fsdp"], norms["ddp"], rtol=1e-5)


def _state_after_zero_steps(cfg):
    from pid_fast.train.builders import build_student, build_teacher

    resolved = resolve_config(cfg)
    teacher, teacher_net = build_teacher(resolved["teacher"], torch.device("cpu"))
    net, _ = build_student(resolved["student"], teacher, teacher_net, torch.device("cpu"))
    return net.state_dict()


_CHILD = """
import json, sys
from pid_fast.train import train_local_ddp
train_local_ddp(json.loads(sys.argv[1]), sys.argv[2], world_size=2)
"""


def test_fsdp_killed_at_random_moments_resumes_exactly(tmp_path):
    """SIGKILL a 2-process fsdp run (its whole process group) while it writes sharded checkpoints
    every step: every listed checkpoint is finished and consolidates, an unfinished folder is
    never resumed from (and is deleted), and the resumed run ends bit-identical to an
    uninterrupted one."""
    cfg = tiny_config(**{"parallel": "fsdp", "total_steps": 100000, "checkpoint_every": 1, "log_every": 1,
                         "keep_checkpoints": 3, "accum": 2, "batch_size": 8, "clip_grad_norm": 1.0})
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg), str(run)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(run):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoints written"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.5))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its two ranks
        proc.wait()
    checkpoints = list_checkpoints(run)
    for step, path in checkpoints:  # every listed folder is finished and consolidates
        assert os.path.isfile(os.path.join(path, FINISHED_MARKER))
        state = read_checkpoint(path)
        assert state["step"] == step and set(state["ema"]) == {"0.9", "0.99"}
    last = checkpoints[0][0]
    unfinished = run / f"checkpoint-{last + 50:09d}.dcp"  # as a kill mid-write leaves it
    unfinished.mkdir()
    (unfinished / ".metadata").write_bytes(b"partial")
    total = last + 2
    cfg = apply_overrides(cfg, {"total_steps": total})
    train_local_runs([(cfg, run, True), (cfg, tmp_path / "straight", False)], world_size=2)
    assert not unfinished.exists()
    assert list_checkpoints(run)[0][0] == total
    a, b = _state(run), _state(tmp_path / "straight")
    assert_same_state(a["model"], b["model"])
    assert_same_state(a["ema"], b["ema"])
    assert _losses(run)[-2:] == _losses(tmp_path / "straight")[-2:]
    # the optimizer state resumed too: meta and the sharded optimizer entries are there
    assert "optimizer" not in a and read_sharded_meta(list_checkpoints(run)[0][1])["world_size"] == 2


def test_sharded_checkpoint_for_sample_fid_and_export(tmp_path):
    """sample / fid / export-diffusers read a sharded folder (or its run folder) as full weights:
    the samples equal those of the same student saved as a .pt checkpoint."""
    from pid_fast.cli import main as group
    from pid_fast.eval.checkpoints import checkpoint_info, load_scored_student, newest_checkpoint
    from pid_fast.train.threads import recorded_threads

    cfg = tiny_config(**{"total_steps": 2, "checkpoint_every": 2, "student.init": "teacher",
                         "student.network": None})
    train(cfg, tmp_path / "plain")
    train(apply_overrides(cfg, {"parallel": "fsdp"}), tmp_path / "fsdp")
    folder = list_checkpoints(tmp_path / "fsdp")[0][1]
    assert newest_checkpoint(tmp_path / "fsdp") == folder == newest_checkpoint(folder)
    assert checkpoint_info(folder) == {"step": 2, "ema_rates": [0.9, 0.99]}
    assert recorded_threads(tmp_path / "fsdp") == torch.get_num_threads() == 1  # what --resume keeps
    net, meta, used = load_scored_student(folder, weights="ema-0.99")
    ref, _, _ = load_scored_student(tmp_path / "plain", weights="ema-0.99")
    assert_same_state(net.state_dict(), ref.state_dict(), exact=False)
    runner = CliRunner()
    outs = {}
    for name, source in (("fsdp", folder), ("plain", str(tmp_path / "plain"))):
        out = tmp_path / f"{name}.npz"
        res = runner.invoke(group, ["sample", source, str(out), "--num", "3", "--device", "cpu"])
        assert res.exit_code == 0, res.output
        outs[name] = np.load(out)["x"]
    np.testing.assert_allclose(outs["fsdp"], outs["plain"], atol=1e-5)


def test_fsdp_diffusers_student_through_sample_fid_and_export(tmp_path):
    """`distill --parallel fsdp` of a diffusers UNet student (its down/up blocks as units, the
    teacher replicated), then sample, fid and export-diffusers on the run folder: the exported
    pipeline's one-step sample equals `pid-fast sample`'s."""
    pytest.importorskip("diffusers")
    from pid_fast.cli import main as group
    from pid_fast.data.assets import DEFAULT_FEATURES
    from pid_fast.io.diffusers_io import load_one_step, one_step_sample
    from pid_fast.sampling import seeded_latents
    from test_diffusers_teacher import _config, save_teacher

    config = tmp_path / "config.json"
    config.write_text(json.dumps(_config(save_teacher(tmp_path / "teacher"), teacher_sharding=False)))
    run = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(group, ["distill", "--config", str(config), "--run-dir", str(run), "--threads", "1",
                                "--parallel", "fsdp"])
    assert res.exit_code == 0, res.output
    assert list_checkpoints(run)[0][1].endswith(".dcp")
    res = runner.invoke(group, ["sample", str(run), str(tmp_path / "s.npz"), "--num", "4", "--weights", "model"])
    assert res.exit_code == 0, res.output
    x = np.load(tmp_path / "s.npz")["x"]
    if os.path.isfile(DEFAULT_FEATURES):
        res = runner.invoke(group, ["fid", str(run), "--features", "digits", "--num", "20", "--batch", "10"])
        assert res.exit_code == 0, res.output
        assert np.isfinite(float(res.output.strip().split()[-1]))
    out = tmp_path / "one-step"
    res = runner.invoke(group, ["export-diffusers", str(run), str(out), "--weights", "model"])
    assert res.exit_code == 0, res.output
    loaded, settings = load_one_step(out)
    z, _ = seeded_latents(range(4), settings["shape"])
    np.testing.assert_allclose(one_step_sample(loaded, settings, z).numpy(), x, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16-mixed"])
def test_fsdp_16bit_modes_and_power_emas_in_one_process(tmp_path, precision):
    """The pure bf16 mode (16-bit gathered weights) and fp16-mixed (fp32 weights, autocast, loss
    scaling) train close to their plain runs; power-EMA snapshots of sharded EMAs are written
    full (gathered), equal to the unsharded run's."""
    from pid_fast.train.power_ema import list_snapshots

    cfg = tiny_config(**{"precision": precision, "clip_grad_norm": 1.0, "total_steps": 3, "log_every": 1, "checkpoint_every": 3,
                         "power_ema.sigma_rels": [0.1], "power_ema.snapshot_every": 3})
    train(cfg, tmp_path / "plain")
    train(apply_overrides(cfg, {"parallel": "fsdp"}), tmp_path / "fsdp")
    la, lb = _losses(tmp_path / "plain"), _losses(tmp_path / "fsdp")
    assert np.all(np.isfinite(lb))
    np.testing.assert_allclose(lb, la, rtol=0.05)  # bf16 rounding: gathered bf16 weights vs autocast's casts
    (_, path_a), (_, path_b) = list_snapshots(tmp_path / "plain")[-1], list_snapshots(tmp_path / "fsdp")[-1]
    a, b = torch.load(path_a, weights_only=True), torch.load(path_b, weights_only=True)
    assert a["ema"].keys() == b["ema"].keys()
    key = next(iter(a["ema"]))
    assert all(type(v) is torch.Tensor for v in b["ema"][key].values())  # full tensors, not DTensors
    assert _max_diff(a["ema"][key], b["ema"][key]) < 0.05
