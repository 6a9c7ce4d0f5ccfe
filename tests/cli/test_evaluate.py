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
