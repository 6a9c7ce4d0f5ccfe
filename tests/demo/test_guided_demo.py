"""`pid-fast demo --guidance W` on a tiny class-conditional teacher (seconds), and the
class-conditional teacher training (label dropout) behind it."""

import json

import pytest
import torch
from click.testing import CliRunner

from pid_fast.cli import main
from pid_fast.demo import digits
from pid_fast.demo.guided import guided_scores, run_guided_demo
from pid_fast.demo.teacher import _dropped_labels, load_digits_teacher

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"model_channels": 8, "channel_mult": (1, 2), "channel_mult_emb": 1}


@pytest.fixture(scope="module")
def tiny_conditional(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-cond")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        teacher = d / "teacher.safetensors"
        digits.train_teacher(teacher, steps=3, batch_size=4, network=TINY, class_conditional=True, label_dropout=0.5,
                             progress=False)
        unconditional = d / "uncond.safetensors"
        digits.train_teacher(unconditional, steps=1, batch_size=4, network=TINY, progress=False)
        features = d / "features.safetensors"
        digits.train_classifier(features, epochs=1, channels=4, feature_dim=8, progress=False)
    finally:
        torch.set_num_threads(threads)
    return str(teacher), str(unconditional), str(features)


def test_label_dropout_zeroes_that_share_of_labels():
    gen = torch.Generator().manual_seed(0)
    labels = _dropped_labels(torch.arange(10).repeat(400), 0.25, gen)
    assert labels.shape == (4000, 10) and set(labels.sum(1).tolist()) == {0.0, 1.0}
    assert abs(float((labels.sum(1) == 0).float().mean()) - 0.25) < 0.03
    assert torch.equal(labels.argmax(1)[labels.sum(1) > 0], torch.arange(10).repeat(400)[labels.sum(1) > 0])


def test_conditional_teacher_takes_labels(tiny_conditional):
    teacher = load_digits_teacher(tiny_conditional[0])
    assert teacher.label_dim == 10
    x, sigma = torch.randn(3, 1, 16, 16), torch.full((3,), 2.0)
    with torch.no_grad():
        a = teacher(x, sigma, torch.nn.functional.one_hot(torch.tensor([0, 1, 2]), 10).float())
        b = teacher(x, sigma, torch.zeros(3, 10))
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="label_dropout"):
        digits.train_teacher("unused.safetensors", steps=1, label_dropout=0.1, progress=False)


def test_guided_scores_of_the_reference_itself(monkeypatch):
    from pid_fast.eval.digits import DigitsClassifier

    class Features:
        def features(self, x):
            return x.flatten(1)[:, :4].double().numpy()

    images = torch.rand(40, 1, 16, 16) * 2 - 1
    labels = torch.arange(40) % 10
    classifier = DigitsClassifier(channels=4, feature_dim=8)
    monkeypatch.setattr("pid_fast.demo.guided.digits_reference_features",
                        lambda features: images.flatten(1)[:, :4].double().numpy())
    scores = guided_scores(images, labels, images, Features(), classifier)
    assert scores["rmse_to_heun"] == 0.0 and abs(scores["fd_to_teacher"]) < 1e-6 and abs(scores["fd"]) < 1e-6
    with torch.no_grad():
        correct = classifier(images).argmax(1) == labels
    expected = sum(float(correct[labels == c].float().mean()) for c in range(10)) / 10
    assert scores["accuracy"] == pytest.approx(expected)


def test_guided_demo_end_to_end(tmp_path, tiny_conditional):
    teacher, unconditional, features = tiny_conditional
    lines = []
    summary = run_guided_demo(tmp_path / "g", scale=3.0, teacher_path=teacher, features_path=features, steps=2,
                              batch_size=4, num_samples=20, progress=False, threads=1, log=lines.append)
    assert set(summary["rows"]) == {"teacher w=1", "student w=1", "teacher w=3", "student w=3"}
    for name, row in summary["rows"].items():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["fd"] == row["fd"], name
    assert summary["rows"]["teacher w=1"]["rmse_to_heun"] == 0.0
    assert summary["rows"]["student w=3"]["rmse_to_heun"] > 0.0
    assert "FD to teacher" in lines[-1] and "student w=3" in lines[-1]
    stored = json.loads((tmp_path / "g" / "summary.json").read_text())
    assert stored["rows"]["student w=3"]["fd_to_teacher"] == pytest.approx(summary["rows"]["student w=3"]["fd_to_teacher"])
    config = json.loads((tmp_path / "g" / "run-w3" / "config.json").read_text())
    assert config["teacher"]["guidance"] == {"scale": 3.0, "guide": "unconditional"}
    # An unconditional teacher cannot guide itself: a clear error, through the CLI too.
    res = CliRunner().invoke(main, ["demo", "--guidance", "2", "--teacher", unconditional, "--features", features,
                                    "--out-dir", str(tmp_path / "u"), "--steps", "1", "--no-progress"])
    assert res.exit_code != 0 and "class-conditional" in res.output
