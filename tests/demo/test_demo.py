"""`pid-fast demo` end to end on a tiny teacher (seconds), and the plots."""

import json
import os

import pytest
import torch

from pid_fast.demo import digits
from pid_fast.demo.run import format_table, run_demo
from pid_fast.eval.plots import plot_fd_over_training, plot_fd_vs_n, plot_loss_curve, read_log, save_comparison_grid


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == PNG


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    teacher = d / "teacher.safetensors"
    threads = torch.get_num_threads()  # (module scope: set up before the one_thread fixture)
    torch.set_num_threads(1)
    try:
        digits.train_teacher(teacher, steps=2, batch_size=4, network={"model_channels": 8, "channel_mult": (1, 2),
                                                                      "channel_mult_emb": 1}, progress=False)
        features = d / "features.safetensors"
        digits.train_classifier(features, epochs=1, channels=4, feature_dim=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    return str(teacher), str(features)


def _demo(out, tiny_files, **kw):
    teacher, features = tiny_files
    args = dict(steps=4, chunk=2, batch_size=4, num_samples=24, analytic=False, teacher_path=teacher,
                features_path=features, max_minutes=None, progress=False, log=lambda s: None, threads=1)
    args.update(kw)
    return run_demo(out, **args)


def test_demo_end_to_end_and_resume(tmp_path, tiny_files):
    lines = []
    s = _demo(tmp_path / "demo", tiny_files, log=lines.append)
    for key in ("student", "heun", "euler", "real"):
        assert torch.isfinite(torch.tensor(s["rows"][key]["fd"])), key
    assert s["rows"]["heun"]["nfe"] == 35 and s["rows"]["student"]["nfe"] == 1
    assert s["ratio"] == pytest.approx(s["rows"]["student"]["fd"] / s["rows"]["heun"]["fd"])
    assert s["steps"] == 4 and not s["stopped_early"]
    assert s["fd_over_training"]["steps"] == [2, 4]
    assert all(len(s["fd_over_training"][w]) == 2 for w in ["model"] + [f"ema-{r}" for r in s["config"]["ema_rates"]])
    assert s["weights"] == "model"  # after 4 steps every EMA still holds most of the initial weights
    for name in ("samples", "loss", "fd_over_training"):
        assert _is_png(s["pictures"][name]), name
    with open(tmp_path / "demo" / "summary.json") as f:
        assert json.load(f)["steps"] == 4
    # The distance to the teacher's Heun samples from the same noise comes first: 0 for the teacher.
    assert s["rows"]["heun"]["fd_teacher"] == pytest.approx(0.0, abs=1e-6) and s["rows"]["heun"]["rmse_to_heun"] == 0
    assert s["rows"]["student"]["rmse_to_heun"] > 0 and s["rows"]["euler"]["rmse_to_heun"] > 0
    assert "rmse_to_heun" not in s["rows"]["real"] and s["rows"]["real"]["fd_teacher"] > 0  # other images
    assert s["fd_teacher_over_training"]["steps"] == [2, 4] and len(s["fd_teacher_over_training"]["model"]) == 2
    assert _is_png(s["pictures"]["fd_teacher_over_training"])
    table = lines[-1]
    header = table.splitlines()[0]
    assert header.index("FD to teacher") < header.index("RMSE to Heun") < header.index("FD to data")
    assert f"student's distance to the teacher: FD {s['rows']['student']['fd_teacher']:.3f}" in table
    assert "student FD to data / teacher Heun FD to data" in table and "teacher, Heun 18 steps" in table
    assert s["pictures"]["samples"] in table

    # The same folder again: refused unless resumed; resuming continues the same run.
    with pytest.raises(FileExistsError, match="resume"):
        _demo(tmp_path / "demo", tiny_files)
    s2 = _demo(tmp_path / "demo", tiny_files, steps=6, resume=True)
    assert s2["steps"] == 6 and s2["fd_over_training"]["steps"] == [2, 4, 6]


def test_demo_time_budget_stops_at_a_chunk(tmp_path, tiny_files):
    s = _demo(tmp_path / "demo", tiny_files, steps=6, max_minutes=1e-6)
    assert s["stopped_early"] and s["steps"] == 2
    assert "stopped by the time budget" in format_table(s)


def test_demo_analytic_branch(tmp_path, tiny_files, monkeypatch):
    import pid_fast.demo.analytic_sweep as analytic

    rows = [{"N": n, "rmse": 1.0 / n, "fd": 1.0 / n ** 2, "euler_rmse": 0.5 / n, "euler_fd": 0.2 / n ** 2,
             "l2": 1.0 / n, "seconds": 0.0} for n in (2, 4, 8)]
    monkeypatch.setattr(analytic, "sweep_n", lambda *a, **k: rows)
    s = _demo(tmp_path / "demo", tiny_files, steps=2, analytic=True)
    assert _is_png(s["pictures"]["fd_vs_n"]) and s["analytic"] == rows
    assert "N=2: 0.500" in format_table(s)


def test_demo_bad_input(tmp_path, tiny_files):
    with pytest.raises(ValueError, match="steps"):
        _demo(tmp_path / "a", tiny_files, steps=0)
    with pytest.raises(ValueError, match="weights"):
        _demo(tmp_path / "b", tiny_files, weights="ema-0.5")
    with pytest.raises(ValueError, match="weights"):
        _demo(tmp_path / "b", tiny_files, weights="best")
    with pytest.raises(ValueError, match="num_samples"):
        _demo(tmp_path / "c", tiny_files, num_samples=1)
    with pytest.raises(ValueError, match="max_minutes"):
        _demo(tmp_path / "d", tiny_files, max_minutes=-1)
    with pytest.raises(ValueError, match="N must be"):
        _demo(tmp_path / "e", tiny_files, N=1)
    with pytest.raises(ValueError, match="indices_per_noise must be"):
        _demo(tmp_path / "e", tiny_files, indices_per_noise=0)
    with pytest.raises(FileNotFoundError, match="train-teacher"):
        _demo(tmp_path / "f", tiny_files, teacher_path=str(tmp_path / "absent.safetensors"))


def test_cli_demo(tmp_path, tiny_files):
    from click.testing import CliRunner

    from pid_fast.cli import main as group  # the `pid-fast` group, with the eval commands registered

    teacher, features = tiny_files
    res = CliRunner().invoke(group, ["demo", "--out-dir", str(tmp_path / "d"), "--steps", "2", "--batch-size", "4",
                                     "--num-samples", "16", "--teacher", teacher, "--features", features,
                                     "--no-analytic", "--no-progress", "--norm", "l2", "--N", "16", "--threads", "1",
                                     "--indices-per-noise", "2"])
    assert res.exit_code == 0, res.output
    assert "student's distance to the teacher: FD" in res.output and "student_vs_teacher.png" in res.output
    assert os.path.isfile(tmp_path / "d" / "loss.png")
    with open(tmp_path / "d" / "summary.json") as f:
        cfg = json.load(f)["config"]
    assert cfg["loss"]["norm"] == "l2" and cfg["loss"]["N"] == 16 and cfg["loss"]["huber_c"] is None
    assert cfg["grid"]["indices_per_noise"] == 2 and "x 2 grid points per noise" in res.output
    res = CliRunner().invoke(group, ["demo", "--out-dir", str(tmp_path / "d"), "--steps", "2",
                                     "--teacher", teacher, "--features", features, "--no-analytic"])
    assert res.exit_code != 0 and "--resume" in res.output and "--overwrite" in res.output
    assert "Traceback" not in res.output
    (tmp_path / "d" / "run" / "marker").write_text("old run")
    res = CliRunner().invoke(group, ["demo", "--out-dir", str(tmp_path / "d"), "--steps", "2", "--batch-size", "4",
                                     "--num-samples", "16", "--teacher", teacher, "--features", features,
                                     "--no-analytic", "--no-progress", "--threads", "1", "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (tmp_path / "d" / "run" / "marker").exists()  # the old run was replaced
    res = CliRunner().invoke(group, ["demo", "--out-dir", str(tmp_path / "d"), "--teacher", teacher,
                                     "--features", features, "--resume", "--overwrite"])
    assert res.exit_code != 0 and "exclude each other" in res.output


def test_pick_threads_times_each_candidate():
    from pid_fast.demo.run import pick_threads
    from pid_fast.models.networks import build_network

    net = build_network("tiny-ddpmpp")
    # (Only 1 thread here: on a busy test machine every extra thread costs seconds.)
    best, timings = pick_threads(net, (2, 3, 8, 8), candidates=[1], repeats=1)
    assert best == 1 and set(timings) == {1} and timings[1] > 0
    assert torch.get_num_threads() == 1  # restored
    assert all(p.grad is None for p in net.parameters())  # timed on a copy


def test_pick_weights():
    from pid_fast.demo.run import pick_weights

    rates = [0.99, 0.998]
    assert pick_weights("auto", rates, 10) == "model"
    assert pick_weights("auto", rates, 300) == "ema-0.99"      # 0.99^300 = 0.05, 0.998^300 = 0.55
    assert pick_weights("auto", rates, 2000) == "ema-0.998"    # 0.998^2000 = 0.02
    assert pick_weights("ema-0.99", rates, 1) == "ema-0.99"
    assert pick_weights("model", rates, 1) == "model"
    with pytest.raises(ValueError, match="weights"):
        pick_weights("ema-0.9", rates, 1)


# ----------------------------------------------------------------------------------------
# Plots

def test_plots_write_pngs(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 10, "loss": 0.5}\n{"step": 20, "event": "x"}\n{"step": 20, "loss": 0.2}\n{"step": 3')
    rows = read_log(log)
    assert [r["step"] for r in rows] == [10, 20]  # non-loss and truncated lines skipped
    assert _is_png(plot_loss_curve(log, tmp_path / "loss.png"))
    assert _is_png(plot_fd_over_training([1, 2, 3], {"student": [30.0, 20.0, 10.0]}, tmp_path / "fd.png",
                                         references={"teacher": 8.0}))
    assert _is_png(plot_fd_vs_n([{"N": 2, "rmse": 0.5, "fd": 0.3}, {"N": 8, "rmse": 0.1, "fd": 0.01}],
                                tmp_path / "n.png"))
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    assert _is_png(save_comparison_grid({"a": x, "b": x}, tmp_path / "g.png", cols=3))


def test_plots_bad_input(tmp_path):
    with pytest.raises(ValueError, match="png"):
        plot_loss_curve([{"step": 1, "loss": 1.0}], tmp_path / "loss.jpg")
    with pytest.raises(ValueError, match="no"):
        plot_loss_curve([], tmp_path / "loss.png")
    with pytest.raises(FileNotFoundError):
        read_log(tmp_path / "absent.jsonl")
    with pytest.raises(ValueError, match="fds"):
        plot_fd_over_training([1, 2], {"s": [1.0]}, tmp_path / "fd.png")
    with pytest.raises(ValueError, match="same shape"):
        save_comparison_grid({"a": torch.zeros(2, 1, 4, 4), "b": torch.zeros(3, 1, 4, 4)}, tmp_path / "g.png")
    with pytest.raises(ValueError, match="rows"):
        plot_fd_vs_n([], tmp_path / "n.png")


def test_demo_recipe_matches_the_config_file_and_the_bundled_teacher():
    """configs/digits-fast.json is the demo's recipe as a trainer config, and the recipe's
    lr_scale patterns pick the bundled teacher's time-embedding path (not nothing, not everything)."""
    import fnmatch

    from pid_fast.data.assets import DEFAULT_TEACHER
    from pid_fast.demo.settings import DEMO_DEFAULTS, demo_config
    from pid_fast.demo.teacher import load_digits_teacher
    from pid_fast.train.builders import lr_scale_groups
    from pid_fast.train.config import load_config, resolve_config

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    steps = DEMO_DEFAULTS["steps"]
    demo = resolve_config(demo_config(DEFAULT_TEACHER, steps=steps, batch_size=DEMO_DEFAULTS["batch_size"],
                                      lr=DEMO_DEFAULTS["lr"], N=DEMO_DEFAULTS["N"], norm=DEMO_DEFAULTS["norm"],
                                      huber_c=DEMO_DEFAULTS["huber_c"], ema_rates=DEMO_DEFAULTS["ema_rates"],
                                      chunk=DEMO_DEFAULTS["chunk"]))
    fast = resolve_config(load_config(os.path.join(root, "configs", "digits-fast.json")))
    for key in ("optimizer", "lr_schedule", "grid", "clip_grad_norm", "batch_size", "loss"):
        assert fast[key] == demo[key], key
    assert fast["total_steps"] == steps == demo["lr_schedule"]["decay_steps"]

    net = load_digits_teacher(DEFAULT_TEACHER).model  # the student is the raw U-Net inside EDMPrecond
    named = list(net.named_parameters())
    scales = demo["optimizer"]["lr_scale"]
    groups = lr_scale_groups(named, scales, demo["optimizer"]["lr"])
    scaled = [n for n, _ in named if any(fnmatch.fnmatchcase(n, p) for p in scales)]
    total = sum(p.numel() for _, p in named)
    share = sum(p.numel() for n, p in named if n in scaled) / total
    assert 0.01 < share < 0.2, share  # the time path only (~5% of the parameters)
    assert sum(len(g["params"]) for g in groups) == len(named)
    assert {g["lr"] for g in groups} == {demo["optimizer"]["lr"]} | {demo["optimizer"]["lr"] * f for f in scales.values()}
