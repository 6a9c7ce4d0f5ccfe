"""The trainer: config, exact resume, kill safety, non-finite stop, DDP, CLI, sampling."""

import json
import math
import os
import random
import subprocess
import sys
import time

import click
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pid_fast.models.preconditioning import EDMPrecond, GaussianDenoiser
from pid_fast.models.networks import build_network, network_config
from pid_fast.cli.distill import register
from pid_fast.train import (NonFiniteLossError, apply_overrides, atomic_save, list_checkpoints, load_config,
                            load_latest_checkpoint, load_student, generate, resolve_config, train, train_local_ddp)

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NET = {"name": "tiny-ddpmpp", "model_channels": 8, "channel_mult": [1], "attn_resolutions": []}  # ~9k params
COND_NET = {"name": "tiny-adm", "model_channels": 8, "channel_mult": [1], "attn_resolutions": [],
            "channels_per_head": 8, "label_dim": 3}


def tiny_config(**over):
    cfg = {"device": "cpu", "teacher": {"kind": "network", "network": NET, "precond": "edm", "seed": 0},
           "student": {"init": "random", "network": NET, "seed": 1}, "batch_size": 4, "total_steps": 4,
           "log_every": 2, "checkpoint_every": 2, "snapshot_every": 0, "snapshot_num": 4, "progress": False,
           "ema_rates": [0.9, 0.99], "optimizer": {"lr": 1e-3}}
    return apply_overrides(cfg, over)


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, exact=True):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_state(a[k], b[k], exact)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same_state(x, y, exact)
    elif isinstance(a, torch.Tensor):
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    else:
        assert a == b


def final_state(run_dir):
    path, state = load_latest_checkpoint(run_dir)
    return state


# ------------------------------------------------------------------------------------------
# Config


def test_config_defaults_overrides_and_errors(tmp_path):
    cfg = resolve_config({})
    assert cfg["optimizer"]["name"] == "radam" and cfg["ema_rates"] == [0.999, 0.9999, 0.99995]
    assert cfg["loss"]["N"] == 250 and cfg["loss"]["sigma_max"] == 80.0
    over = apply_overrides({"optimizer": {"name": "adam"}}, ["optimizer.lr=3e-4", "loss.norm=huber",
                                                             "loss.huber_c=0.03", "student.network=null"])
    cfg = resolve_config(over)
    assert cfg["optimizer"] == {"name": "adam", "lr": 3e-4, "betas": [0.9, 0.999], "eps": 1e-8,
                                "weight_decay": 0.0, "lr_scale": {}}
    assert cfg["loss"]["norm"] == "huber" and cfg["student"]["network"] is None
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"_comment": "ignored", "batch_size": 8}))
    assert resolve_config(load_config(path))["batch_size"] == 8
    for bad, key in [({"batch_sise": 8}, "batch_sise"), ({"optimizer": {"lrr": 1}}, "optimizer.lrr"),
                     ({"optimizer": {"name": "sgd"}}, "optimizer.name"), ({"optimizer": {"lr": -1}}, "optimizer.lr"),
                     ({"batch_size": 0}, "batch_size"), ({"precision": "fp8"}, "precision"),
                     ({"ema_rates": [1.5]}, "ema_rates"), ({"loss": {"norm": "huber"}}, "loss.huber_c"),
                     ({"loss": {"norm": "lpips"}}, "loss.lpips_weights"), ({"loss": {"N": 1}}, "loss.N"),
                     ({"teacher": {"kind": "magic"}}, "teacher.kind"),
                     ({"teacher": {"kind": "edm", "path": "x", "net": 1}}, "teacher.net"),
                     ({"teacher": {"kind": "gaussian"}, "student": {"init": "teacher", "network": NET}}, "student.init"),
                     ({"clip_grad_norm": 0}, "clip_grad_norm"), ({"channels_last": "yes"}, "channels_last"),
                     ({"compile": ""}, "compile"), ({"loss": {"teacher_precision": "fp16"}}, "loss.teacher_precision")]:
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            resolve_config(bad)
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["lr"])
    (tmp_path / "c.yaml").write_text("batch_size: 8\n")
    try:
        import yaml  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="PyYAML"):
            load_config(tmp_path / "c.yaml")
    with pytest.raises(ValueError, match="divisible"):
        train(tiny_config(batch_size=6, accum=4), tmp_path / "run")


# ------------------------------------------------------------------------------------------
# Exact resume, atomic checkpoints, kill safety


def test_resume_is_bit_identical(tmp_path):
    """Interrupted at step 3 and resumed = uninterrupted, bit for bit (class-conditional
    teacher, gradient accumulation, clipping, two EMAs, RAdam)."""
    cfg = tiny_config(**{"teacher.network": COND_NET, "student.network": None, "student.init": "teacher",
                         "batch_size": 4, "accum": 2, "clip_grad_norm": 0.5, "total_steps": 6,
                         "checkpoint_every": 3, "log_every": 1})
    full = train(cfg, tmp_path / "full")
    first = train(apply_overrides(cfg, {"total_steps": 3}), tmp_path / "split")
    assert first["step"] == 3
    second = train(cfg, tmp_path / "split", resume=True)
    assert second["step"] == 6 and full["step"] == 6
    a, b = final_state(tmp_path / "full"), final_state(tmp_path / "split")
    for key in ("model", "ema", "optimizer", "step"):
        assert_same_state(a[key], b[key])
    assert not torch.equal(a["model"]["enc.8x8_conv.weight"], a["ema"]["0.99"]["enc.8x8_conv.weight"])
    logs = [json.loads(line) for line in open(tmp_path / "split" / "log.jsonl")]
    full_logs = [json.loads(line) for line in open(tmp_path / "full" / "log.jsonl")]
    assert [r["loss"] for r in logs] == [r["loss"] for r in full_logs]  # same losses, step by step


def test_resume_refuses_a_changed_config(tmp_path):
    cfg = tiny_config(total_steps=2)
    train(cfg, tmp_path)
    with pytest.raises(ValueError, match="optimizer"):
        train(apply_overrides(cfg, {"optimizer.lr": 5e-4, "total_steps": 4}), tmp_path, resume=True)
    assert train(apply_overrides(cfg, {"total_steps": 4}), tmp_path, resume=True)["step"] == 4


def test_atomic_save_never_leaves_a_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint-000000001.pt"
    atomic_save({"format": "x", "v": torch.arange(3)}, path)
    before = path.read_bytes()

    def crash(obj, f):  # a write that dies half way
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": "x", "v": torch.arange(5)}, path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]


def test_unreadable_newest_checkpoint_falls_back(tmp_path):
    cfg = tiny_config(total_steps=2, checkpoint_every=1)
    train(cfg, tmp_path)
    (tmp_path / "checkpoint-000000099.pt").write_bytes(b"garbage")
    (tmp_path / "checkpoint-000000100.pt.tmp-1234").write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="unreadable"):
        path, state = load_latest_checkpoint(tmp_path)
    assert state["step"] == 2 and path.endswith("checkpoint-000000002.pt")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [99, 2, 1]


_CHILD = """
import json, sys, torch
torch.set_num_threads(int(sys.argv[3]))
from pid_fast.train import train
train(json.loads(sys.argv[1]), sys.argv[2])
"""


def test_killed_run_resumes_exactly(tmp_path):
    """SIGKILL a training process at a random moment (checkpoints every step): every
    checkpoint on disk is complete, and resuming from the newest one ends bit-identical to a
    run that was never interrupted."""
    cfg = tiny_config(total_steps=100000, checkpoint_every=1, log_every=1, keep_checkpoints=3)
    run = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(cfg), str(run), str(torch.get_num_threads())],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while len(list_checkpoints(run)) < 2:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no checkpoints written"
            time.sleep(0.02)
        time.sleep(random.uniform(0.0, 0.3))
    finally:
        proc.kill()
        proc.wait()
    ckpts = list_checkpoints(run)
    for step, path in ckpts:  # every file under the final name is complete
        state = load_ckpt(path)
        assert state["step"] == step and state["format"] == "pid_fast.train/1"
    last = ckpts[0][0]
    total = last + 2
    resumed = train(apply_overrides(cfg, {"total_steps": total}), run, resume=True)
    assert resumed["step"] == total
    assert not [f for f in os.listdir(run) if ".tmp-" in f]  # stale temporary files are cleaned up
    train(apply_overrides(cfg, {"total_steps": total}), tmp_path / "straight")
    a, b = final_state(run), final_state(tmp_path / "straight")
    for key in ("model", "ema", "optimizer"):
        assert_same_state(a[key], b[key])


# ------------------------------------------------------------------------------------------
# Non-finite loss


class NaNAfter(GaussianDenoiser):
    """The N(0, 0.5^2) denoiser that returns NaN from its (calls+1)-th call on."""

    def __init__(self, calls):
        super().__init__(0.0, 0.5)
        self.left = calls

    def denoise(self, x, sigma, class_labels=None):
        self.left -= 1
        out = super().denoise(x, sigma, class_labels)
        return out if self.left >= 0 else out * float("nan")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_config(**{"teacher": {"kind": "gaussian"}, "total_steps": 10, "checkpoint_every": 2,
                         "log_every": 100})
    with pytest.raises(NonFiniteLossError, match="step 5") as info:
        train(cfg, tmp_path, teacher=NaNAfter(calls=4))
    assert info.value.step == 5 and info.value.last_checkpoint.endswith("checkpoint-000000004.pt")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 2]  # nothing written after the bad step
    state = load_ckpt(info.value.last_checkpoint)
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    events = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert events[-1]["event"] == "non-finite loss" and events[-1]["step"] == 5


# ------------------------------------------------------------------------------------------
# DDP


def test_ddp_two_processes_match_one(tmp_path):
    """2 CPU processes (gloo) x 2 accumulation rounds = 1 process with the same global batch."""
    cfg = tiny_config(**{"batch_size": 8, "total_steps": 3, "checkpoint_every": 3, "log_every": 1,
                         "student.init": "teacher", "student.network": None})
    train_local_ddp(apply_overrides(cfg, {"accum": 2}), tmp_path / "ddp", world_size=2)
    train(cfg, tmp_path / "single")
    a, b = final_state(tmp_path / "ddp"), final_state(tmp_path / "single")
    assert a["world_size"] == 2 and b["world_size"] == 1 and len(a["rng"]) == 2
    assert_same_state(a["model"], b["model"], exact=False)
    assert_same_state(a["ema"], b["ema"], exact=False)
    la = [json.loads(line)["loss"] for line in open(tmp_path / "ddp" / "log.jsonl")]
    lb = [json.loads(line)["loss"] for line in open(tmp_path / "single" / "log.jsonl")]
    np.testing.assert_allclose(la, lb, rtol=1e-4)
    moved = sum(float((a["model"][k] - load_ckpt(list_checkpoints(tmp_path / "single")[0][1])["ema"]["0.99"][k])
                      .abs().sum()) for k in a["model"])
    assert moved > 0


# ------------------------------------------------------------------------------------------
# Training behaviour, precision, class labels, LPIPS


def test_gaussian_teacher_student_learns_the_ode_solution(tmp_path):
    """Distilling the exact N(0, 0.5^2) denoiser, whose PF-ODE solution is known in closed
    form: after 60 steps the one-step sample (t = sigma_min) of the student is much closer to
    the exact x(sigma_min) than the untrained student's."""
    from pid_fast.sampling import student_trajectory

    cfg = tiny_config(**{"teacher": {"kind": "gaussian"}, "batch_size": 16, "total_steps": 60,
                         "log_every": 10, "checkpoint_every": 60, "optimizer": {"name": "adam", "lr": 5e-3}})
    train(cfg, tmp_path)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "log.jsonl")]
    assert len(losses) == 6 and all(np.isfinite(losses))
    gauss = GaussianDenoiser(0.0, 0.5)
    n = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(123)) * 80.0
    exact = gauss.ode_solution(n, 80.0, 0.002)

    def error(net):
        with torch.no_grad():
            return float((student_trajectory(net, n, 0.002) - exact).square().mean())

    torch.manual_seed(0)
    untrained = build_network(network_config(**NET)).eval()
    trained, _ = load_student(tmp_path)
    assert error(trained) < 0.3 * error(untrained)


def test_bf16_and_adam(tmp_path):
    cfg = tiny_config(**{"precision": "bf16", "optimizer.name": "adam", "total_steps": 2})
    out = train(cfg, tmp_path)
    assert np.isfinite(out["loss"])
    state = final_state(tmp_path)
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
    assert "exp_avg" in next(iter(state["optimizer"]["state"].values()))


def test_auto_precision_settings():
    from pid_fast.train.builders import resolve_precision

    cfg = resolve_config({})
    # auto on a GPU: the fastest mode meeting the fidelity rule (README: Precision)
    assert resolve_precision(cfg, torch.device("cuda")) == {"precision": "fp16-mixed", "teacher_precision": None,
                                                            "channels_last": True}
    assert resolve_precision(cfg, torch.device("cpu")) == {"precision": "fp32", "teacher_precision": None,
                                                           "channels_last": False}
    cfg = resolve_config({"precision": "bf16", "channels_last": False, "loss": {"teacher_precision": None}})
    assert resolve_precision(cfg, torch.device("cuda")) == {"precision": "bf16", "teacher_precision": None,
                                                            "channels_last": False}
    cfg = resolve_config({"precision": "fp32", "loss": {"teacher_precision": "bf16"}})
    assert resolve_precision(cfg, torch.device("cpu"))["teacher_precision"] == "bf16"
    for mode, teacher in (("bf16", "bf16"), ("bf16-mixed", "bf16"), ("fp16", None), ("fp16-mixed", None)):
        assert resolve_precision(resolve_config({"precision": mode}), torch.device("cuda"))["teacher_precision"] == teacher


class AutocastRecorder(EDMPrecond):
    """Records whether the teacher ran under bf16 autocast."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.autocast = []

    def raw(self, x_in, c_noise, class_labels=None, force_fp32=False):
        self.autocast.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return super().raw(x_in, c_noise, class_labels, force_fp32)


@pytest.mark.parametrize("over", [{"channels_last": True}, {"compile": "aot_eager"},
                                  {"precision": "bf16", "loss.teacher_precision": "auto"},
                                  {"precision": "bf16", "compile": "aot_eager", "channels_last": True}],
                         ids=["channels_last", "compile", "bf16-teacher", "bf16-compile"])
def test_fast_step_options_keep_the_loss(tmp_path, over):
    """The fast step's options (channels_last networks, a compiled student, the teacher in
    bf16) train the same student as the plain fp32 step, within their precision."""
    torch.manual_seed(0)
    teacher = AutocastRecorder(build_network(network_config(**NET)))
    cfg = tiny_config(**{"student.init": "teacher", "student.network": None, "total_steps": 3,
                         "log_every": 1, "checkpoint_every": 3})
    train(cfg, tmp_path / "plain", teacher=teacher)
    assert not any(teacher.autocast)
    teacher.autocast.clear()
    train(apply_overrides(cfg, over), tmp_path / "fast", teacher=teacher)
    bf16 = over.get("precision") == "bf16"
    assert all(teacher.autocast) if bf16 else not any(teacher.autocast)
    plain = [json.loads(line)["loss"] for line in open(tmp_path / "plain" / "log.jsonl")]
    fast = [json.loads(line)["loss"] for line in open(tmp_path / "fast" / "log.jsonl")]
    assert len(plain) == len(fast) == 3
    np.testing.assert_allclose(fast, plain, rtol=5e-2 if bf16 else 1e-4)
    a, b = final_state(tmp_path / "plain")["model"], final_state(tmp_path / "fast")["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=5e-3 if bf16 else 1e-5)


class LabelRecorder(EDMPrecond):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels, self.noise_levels = [], []

    def raw(self, x_in, c_noise, class_labels=None, force_fp32=False):
        self.labels.append(class_labels.clone())
        self.noise_levels.append(c_noise.detach().reshape(-1).clone())
        return super().raw(x_in, c_noise, class_labels, force_fp32)


def test_indices_per_noise_runs_k_points_of_each_trajectory(tmp_path):
    """grid.indices_per_noise 3: each step's teacher pass has 3 x batch rows, each noise (and its
    label) three times in a row at independently drawn grid points."""
    net_cfg = network_config("tiny-adm", **{k: v for k, v in COND_NET.items() if k != "name"})
    torch.manual_seed(0)
    teacher = LabelRecorder(build_network(net_cfg), label_dim=3)
    cfg = tiny_config(**{"teacher.network": COND_NET, "student.network": COND_NET, "batch_size": 8,
                         "total_steps": 2, "grid.indices_per_noise": 3})
    train(cfg, tmp_path, teacher=teacher)
    assert [tuple(lab.shape) for lab in teacher.labels] == [(24, 3), (24, 3)]
    for labels, levels in zip(teacher.labels, teacher.noise_levels):
        groups = labels.reshape(8, 3, 3)
        assert torch.equal(groups, groups[:, :1].expand_as(groups))  # one label per noise, repeated
        assert levels.numel() == 24 and len(torch.unique(levels.reshape(8, 3)[:, 0])) > 1
        assert any(len(torch.unique(g)) > 1 for g in levels.reshape(8, 3))  # points differ along a trajectory
    logs = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    assert all(math.isfinite(r["loss"]) for r in logs if "loss" in r)


def test_class_conditional_uniform_labels(tmp_path):
    net_cfg = network_config("tiny-adm", **{k: v for k, v in COND_NET.items() if k != "name"})
    torch.manual_seed(0)
    teacher = LabelRecorder(build_network(net_cfg), label_dim=3)
    cfg = tiny_config(**{"teacher.network": COND_NET, "student.network": COND_NET, "batch_size": 16,
                         "total_steps": 2})
    train(cfg, tmp_path, teacher=teacher)
    labels = torch.cat(teacher.labels)
    assert labels.shape == (32, 3) and torch.equal(labels.sum(1), torch.ones(32))  # one-hot
    counts = labels.sum(0)
    assert bool((counts > 0).all())  # all classes drawn
    assert not torch.equal(teacher.labels[0], teacher.labels[1])
    net, meta = load_student(tmp_path, weights="ema-0.9")
    x, lab = generate(net, meta, range(4), batch=3, class_label=2)
    assert x.shape == (4, 3, 8, 8) and lab.tolist() == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="class_label"):
        generate(net, meta, range(2), class_label=3)


def test_lpips_norm_in_trainer(tmp_path):
    import torchvision

    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    cfg = tiny_config(**{"loss.norm": "lpips", "loss.lpips_net": "alex", "loss.lpips_resize": 32,
                         "loss.lpips_weights": str(weights), "total_steps": 2, "batch_size": 2})
    assert np.isfinite(train(cfg, tmp_path / "run")["loss"])
    with pytest.raises(FileNotFoundError, match="LPIPS backbone weights not found"):
        train(apply_overrides(cfg, {"loss.lpips_weights": str(tmp_path / "nope.pth")}), tmp_path / "run2")


# ------------------------------------------------------------------------------------------
# CLI: distill and sample


def test_cli_distill_and_sample(tmp_path):
    from PIL import Image

    group = click.Group()
    register(group)
    runner = CliRunner()
    cfg_path = tmp_path / "tiny.json"
    cfg = tiny_config(snapshot_every=2)
    cfg_path.write_text(json.dumps(cfg))
    run = tmp_path / "run"
    res = runner.invoke(group, ["distill", "--config", str(cfg_path), "--run-dir", str(run), "--total-steps", "4",
                                "--set", "optimizer.lr=0.002", "--log-every", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "done: step 4" in res.output
    log = [json.loads(line) for line in open(run / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(np.isfinite(r["loss"]) and r["images_per_s"] > 0 and r["lr"] == 0.002 for r in log)
    assert json.load(open(run / "config.json"))["optimizer"]["lr"] == 0.002
    for step in (0, 2, 4):
        grid = Image.open(run / f"samples-{step:09d}.png")
        assert grid.size == (16, 16) and grid.mode == "RGB"  # 4 samples of 8 x 8 in a 2 x 2 grid

    res = runner.invoke(group, ["sample", str(run), str(tmp_path / "png"), "--num", "5", "--batch", "2",
                                "--device", "cpu"])
    assert res.exit_code == 0, res.output
    files = sorted(os.listdir(tmp_path / "png"))
    assert files == [f"{s:06d}.png" for s in range(5)]
    res = runner.invoke(group, ["sample", str(run), str(tmp_path / "s.npz"), "--num", "5", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (5, 8, 8, 3) and data["images"].dtype == np.uint8
    assert data["x"].shape == (5, 3, 8, 8) and np.abs(data["x"]).max() <= 1
    assert data["seeds"].tolist() == [0, 1, 2, 3, 4]
    for s in range(5):  # the same seed gives the same image whatever the batch
        assert np.array_equal(np.asarray(Image.open(tmp_path / "png" / f"{s:06d}.png")), data["images"][s])
    res = runner.invoke(group, ["sample", str(run), str(tmp_path / "e.npz"), "--num", "2", "--weights", "ema-0.99",
                                "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert not np.array_equal(np.load(tmp_path / "e.npz")["x"], data["x"][:2])

    res = runner.invoke(group, ["sample", str(run), str(tmp_path / "x.npz"), "--weights", "ema-0.5"])
    assert res.exit_code != 0 and "no EMA with rate" in res.output
    res = runner.invoke(group, ["distill", "--config", str(cfg_path), "--run-dir", str(run), "--set", "loss.norm=l3"])
    assert res.exit_code != 0 and "loss.norm" in res.output


def test_converted_edm_teacher_file(tmp_path):
    """teacher.kind 'edm' reads a file written by `pid-fast convert`; the student starts as an
    exact copy of the teacher's network."""
    from pid_fast.io import save_checkpoint
    from pid_fast.train.builders import build_student, build_teacher

    net_cfg = network_config(**COND_NET)
    torch.manual_seed(3)
    weights = build_network(net_cfg).state_dict()
    path = tmp_path / "teacher.safetensors"
    save_checkpoint(path, weights, {"precond": "edm", "network": net_cfg})
    cfg = tiny_config(**{"teacher": {"kind": "edm", "path": str(path)}, "student.init": "teacher",
                         "student.network": None, "total_steps": 1})
    teacher, teacher_net = build_teacher(cfg["teacher"], torch.device("cpu"))
    assert isinstance(teacher, EDMPrecond) and teacher.label_dim == 3
    student, _ = build_student(resolve_config(cfg)["student"], teacher, teacher_net, torch.device("cpu"))
    assert_same_state(student.state_dict(), weights)
    assert np.isfinite(train(cfg, tmp_path / "run")["loss"])
    with pytest.raises(FileNotFoundError, match="teacher.path"):
        train(apply_overrides(cfg, {"teacher.path": str(tmp_path / "missing.safetensors")}), tmp_path / "run2")
