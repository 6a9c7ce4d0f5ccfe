"""`pid-fast fid RUN --all-checkpoints` (every checkpoint x the raw weights and every EMA, a
table, a plot, the best) and the 'auto' weights of `sample` and `fid`."""

import csv
import json
import os

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pid_fast.cli import main
from pid_fast.demo.digits import DEFAULT_FEATURES
from pid_fast.eval import checkpoints, metrics
from pid_fast.train import generate, load_student

pytestmark = pytest.mark.usefixtures("one_thread")

needs_features = pytest.mark.skipif(not os.path.isfile(DEFAULT_FEATURES), reason="bundled feature net missing")


def test_checkpoint_info_and_auto_weights(tiny_run):
    path = str(tiny_run / "checkpoint-000000004.pt")
    assert checkpoints.checkpoint_info(path) == {"step": 4, "ema_rates": [0.5, 0.9]}
    assert checkpoints.newest_checkpoint(tiny_run) == path
    # 'auto': the slowest EMA with rate^step <= 0.15: 0.5^4 = 0.06 yes, 0.9^4 = 0.66 no.
    net, meta, used = checkpoints.load_scored_student(tiny_run)
    assert used == "ema-0.5" and meta["step"] == 4
    ema, _ = load_student(path, weights="ema-0.5")
    for a, b in zip(net.state_dict().values(), ema.state_dict().values()):
        assert torch.equal(a, b)
    # At step 2 neither EMA has forgotten the initial weights enough (0.5^2 = 0.25): the raw weights.
    assert checkpoints.load_scored_student(tiny_run / "checkpoint-000000002.pt")[2] == "model"
    assert checkpoints.load_scored_student(tiny_run, weights="ema-0.9")[2] == "ema-0.9"
    assert checkpoints.weight_sets([0.9, 0.5]) == ["model", "ema-0.5", "ema-0.9"]
    with pytest.raises(ValueError, match="not a pid_fast training checkpoint"):
        torch.save({"step": 1}, tiny_run.parent / "other.pt")
        checkpoints.checkpoint_info(tiny_run.parent / "other.pt")


def test_sample_defaults_to_auto_weights(tmp_path, tiny_run):
    runner = CliRunner()
    res = runner.invoke(main, ["sample", str(tiny_run), str(tmp_path / "auto.npz"), "--num", "3"])
    assert res.exit_code == 0, res.output
    assert "weights ema-0.5, picked by the 'auto' rule" in res.output
    res = runner.invoke(main, ["sample", str(tiny_run), str(tmp_path / "ema.npz"), "--num", "3", "--weights", "ema-0.5"])
    assert res.exit_code == 0 and "weights ema-0.5) ->" in res.output
    res = runner.invoke(main, ["sample", str(tiny_run), str(tmp_path / "model.npz"), "--num", "3", "--weights", "model"])
    assert res.exit_code == 0, res.output
    auto, ema, model = (np.load(tmp_path / f"{n}.npz")["x"] for n in ("auto", "ema", "model"))
    assert np.array_equal(auto, ema) and not np.array_equal(auto, model)


def test_score_checkpoints_rows(tiny_run):
    seen = []

    def score(images):
        seen.append(images.clone())
        return {"fd": float(images.mean()), "kid": 0.0}

    rows = checkpoints.score_checkpoints(tiny_run, score, num=3, seed_start=7)
    assert [(r["step"], r["weights"]) for r in rows] == [(s, w) for s in (2, 4) for w in ("model", "ema-0.5", "ema-0.9")]
    assert all(r["num"] == 3 and os.path.isfile(r["checkpoint"]) for r in rows)
    net, meta = load_student(tiny_run / "checkpoint-000000002.pt", weights="ema-0.9")
    assert torch.equal(seen[2], generate(net, meta, range(7, 10))[0])  # step 2, ema-0.9, seeds 7..9
    assert checkpoints.best_score(rows) == min(rows, key=lambda r: r["fd"])
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoints.score_checkpoints(tiny_run.parent, score, num=3)


@needs_features
def test_cli_fid_all_checkpoints_digits(tiny_run):
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--all-checkpoints", "--num", "40",
                                    "--seed-start", "3", "--batch", "16"])
    assert res.exit_code == 0, res.output
    with open(tiny_run / "scores-digits.json") as f:
        rows = json.load(f)
    assert [(r["step"], r["weights"]) for r in rows] == [(s, w) for s in (2, 4) for w in ("model", "ema-0.5", "ema-0.9")]
    with open(tiny_run / "scores-digits.csv") as f:
        table = list(csv.DictReader(f))
    assert [(int(r["step"]), r["weights"], float(r["fd"]), float(r["kid"])) for r in table] == \
           [(r["step"], r["weights"], r["fd"], r["kid"]) for r in rows]
    assert os.path.getsize(tiny_run / "scores-digits.png") > 0
    # Each row is the single-checkpoint score of those weights on those seeds.
    extractor = metrics.DigitsFeatures()
    net, meta = load_student(tiny_run / "checkpoint-000000002.pt", weights="ema-0.9")
    images, _ = generate(net, meta, range(3, 43))
    feats = metrics.features_of(extractor, images)
    ref = metrics.digits_reference_features(extractor)
    assert rows[2]["fd"] == pytest.approx(metrics.fd_from_features(feats, metrics.feature_statistics(ref)), rel=1e-6)
    assert rows[2]["kid"] == pytest.approx(metrics.kernel_distance(feats, ref), rel=1e-6)
    best = min(rows, key=lambda r: r["fd"])
    assert f"best: step {best['step']}, weights {best['weights']} (digits FD {best['fd']:.4f})" in res.output
    # The single-checkpoint path says which weights 'auto' took.
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--num", "40", "--seed-start", "3"])
    assert res.exit_code == 0, res.output
    assert "weights ema-0.5, picked by the 'auto' rule" in res.output
    fd_auto = float(res.output.strip().split()[-1])
    assert fd_auto == pytest.approx(rows[4]["fd"], abs=1e-4)  # step 4, ema-0.5


def test_cli_fid_all_checkpoints_usage_errors(tmp_path, tiny_run):
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--all-checkpoints", "--inception", "x.pt"])
    assert res.exit_code != 0 and "--ref" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--all-checkpoints",
                                    "--save-stats", str(tmp_path / "s.npz")])
    assert res.exit_code != 0 and "--save-stats" in res.output
    stats = tmp_path / "ref.npz"
    metrics.save_reference_stats(stats, np.random.default_rng(0).normal(size=(20, 64)))
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--all-checkpoints", "--num", "4",
                                    "--ref", str(stats), "--kid"])
    assert res.exit_code != 0 and "--kid needs reference images" in res.output


def _teacher_npz(path, images, seeds):
    np.savez(path, x=images.numpy(), seeds=np.asarray(seeds, dtype=np.int64), labels=np.asarray([], dtype=np.int64))


@needs_features
def test_cli_fid_against_teacher_samples_first_and_picks_by_it(tmp_path, tiny_run):
    """--teacher-samples: the student samples the .npz's seeds; the distance to the teacher's samples
    is printed before the FD to the data; --all-checkpoints picks the best by it. Here the 'teacher'
    samples are those of (step 4, raw weights): that row is at distance 0, the others are not."""
    net, meta = load_student(tiny_run / "checkpoint-000000004.pt", weights="model")
    seeds = list(range(7, 47))
    images, _ = generate(net, meta, seeds)
    _teacher_npz(tmp_path / "teacher.npz", images, seeds)
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--weights", "model",
                                    "--teacher-samples", str(tmp_path / "teacher.npz")])
    assert res.exit_code == 0, res.output
    assert "generating 40 one-step samples" in res.output
    assert "same seeds): FD 0.0000, RMSE 0.0000" in res.output
    assert res.output.index("distance to the teacher's samples") < res.output.index("digits FD vs the 1797 digits")
    # Another checkpoint: the numbers are TeacherDistance's on the same seeds.
    res = CliRunner().invoke(main, ["fid", str(tiny_run / "checkpoint-000000002.pt"), "--features", "digits",
                                    "--weights", "ema-0.9", "--teacher-samples", str(tmp_path / "teacher.npz")])
    assert res.exit_code == 0, res.output
    other, _ = generate(*load_student(tiny_run / "checkpoint-000000002.pt", weights="ema-0.9"), seeds)
    expected = metrics.TeacherDistance(images, metrics.DigitsFeatures())(other)
    assert f"FD {expected['fd_teacher']:.4f}, RMSE {expected['rmse_teacher']:.4f}" in res.output
    assert expected["rmse_teacher"] > 0

    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--all-checkpoints",
                                    "--teacher-samples", str(tmp_path / "teacher.npz"), "--batch", "16"])
    assert res.exit_code == 0, res.output
    with open(tiny_run / "scores-digits.json") as f:
        rows = json.load(f)
    assert all({"fd_teacher", "rmse_teacher", "fd", "kid"} <= set(r) for r in rows) and all(r["num"] == 40 for r in rows)
    best = min(rows, key=lambda r: r["fd_teacher"])
    assert (best["step"], best["weights"]) == (4, "model") and best["rmse_teacher"] == 0.0
    assert "best: step 4, weights model (digits FD to the teacher's samples 0.0000, RMSE 0.0000)" in res.output
    # Picked by the distance to the teacher, not by the FD to the data.
    assert any(r["fd"] < best["fd"] for r in rows) or best == min(rows, key=lambda r: r["fd"])


@needs_features
def test_cli_fid_against_teacher_samples_the_teacher(tmp_path, tiny_run):
    """--against-teacher samples a teacher file from --seed-start.. with --teacher-steps Heun steps."""
    from pid_fast.demo.digits import train_teacher
    from pid_fast.train.teacher_samples import load_sampling_teacher, teacher_samples

    teacher_path = tmp_path / "teacher.safetensors"
    train_teacher(teacher_path, steps=1, batch_size=4, network={"model_channels": 8, "channel_mult": (1,),
                                                                "channel_mult_emb": 1}, progress=False)
    res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", "--weights", "model", "--num", "12",
                                    "--seed-start", "5", "--against-teacher", str(teacher_path), "--teacher-steps", "2"])
    assert res.exit_code == 0, res.output
    teacher, shape, label_dim = load_sampling_teacher(teacher_path)
    reference, _ = teacher_samples(teacher, shape, label_dim, range(5, 17), num_steps=2)
    student, _ = generate(*load_student(tiny_run, weights="model"), range(5, 17))
    expected = metrics.TeacherDistance(reference, metrics.DigitsFeatures())(student)
    assert f"FD {expected['fd_teacher']:.4f}, RMSE {expected['rmse_teacher']:.4f}" in res.output
    assert "heun 2 steps" in res.output


def test_cli_fid_teacher_usage_errors(tmp_path, tiny_run):
    seeds = list(range(4))
    _teacher_npz(tmp_path / "t.npz", torch.zeros(4, 1, 16, 16), seeds)
    cases = [
        (["--teacher-samples", str(tmp_path / "t.npz"), "--against-teacher", str(tmp_path / "t.npz")],
         "exclude each other"),
        (["--lpips", str(tmp_path / "t.npz")], "--lpips measures the distance to the teacher's samples"),
        (["--teacher-samples", str(tmp_path / "t.npz"), "--lpips-lin", str(tmp_path / "t.npz")], "--lpips-lin needs"),
        (["--teacher-samples", str(tmp_path / "t.npz"), "--num", "3"], "--num: 3 samples asked"),
    ]
    for extra, message in cases:
        res = CliRunner().invoke(main, ["fid", str(tiny_run), "--features", "digits", *extra])
        assert res.exit_code != 0 and message in res.output and "Traceback" not in res.output, (extra, res.output)
    # Images whose count differs from the teacher's samples: named, not a crash.
    np.savez(tmp_path / "imgs.npz", x=np.zeros((5, 1, 16, 16), np.float32))
    res = CliRunner().invoke(main, ["fid", str(tmp_path / "imgs.npz"), "--features", "digits",
                                    "--teacher-samples", str(tmp_path / "t.npz")])
    assert res.exit_code != 0 and "--teacher-samples: the teacher's samples are (4, 1, 16, 16)" in res.output
