"""The embedded default: digits data, EDM's training loss, the teacher and the feature
network (training, files, the bundled copies) and their CLI commands."""

import os

import pytest
import torch

from pid_fast.data import digits as data
from pid_fast.demo import digits
from pid_fast.models.preconditioning import EDMPrecond


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

TINY = {"model_channels": 8, "channel_mult": (1, 2), "channel_mult_emb": 1}


def test_load_digits_shape_range_and_values():
    x, y = digits.load_digits()
    assert x.shape == (1797, 1, 16, 16) and x.dtype == torch.float32
    assert float(x.min()) == -1.0 and float(x.max()) <= 1.0
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    # 8x8: exactly sklearn's 0..16 values mapped to [-1, 1].
    from sklearn.datasets import load_digits as sk

    x8, _ = digits.load_digits(8)
    torch.testing.assert_close(x8[:, 0], torch.as_tensor(sk().images, dtype=torch.float32) / 8 - 1)
    # Bilinear upscaling preserves each image's mean up to the border handling.
    torch.testing.assert_close(x.mean((1, 2, 3)), x8.mean((1, 2, 3)), atol=0.05, rtol=0)
    x[0] = 5  # a copy: the cache is not modified
    assert float(digits.load_digits()[0].max()) <= 1.0
    with pytest.raises(ValueError, match="resolution"):
        digits.load_digits(4)


def test_digits_module_re_exports_the_split_modules():
    """pid_fast.demo.digits (and the legacy pid_fast.digits) hands out the objects of
    pid_fast.data.digits, demo/teacher.py, pid_fast.eval.digits and pid_fast.data.assets; the bundled
    files live in pid_fast/assets/."""
    from pid_fast.data import assets as files
    from pid_fast.demo import teacher
    from pid_fast.eval import digits as classifier

    assert all(hasattr(digits, name) for name in digits.__all__)
    assert digits.load_digits is data.load_digits and digits.train_teacher is teacher.train_teacher
    assert digits.DigitsClassifier is classifier.DigitsClassifier and digits.checkpoint_recipe is files.checkpoint_recipe
    for path, name in ((digits.DEFAULT_TEACHER, "digits-teacher.safetensors"),
                       (digits.DEFAULT_FEATURES, "digits-features.safetensors")):
        assert path == os.path.join(os.path.dirname(os.path.dirname(digits.__file__)), "assets", name)


def test_split_is_disjoint_and_complete():
    train, test = digits.digits_split()
    assert len(test) == 359 and len(train) + len(test) == 1797
    assert not set(train.tolist()) & set(test.tolist())
    torch.testing.assert_close(digits.digits_split()[1], test)  # fixed
    with pytest.raises(ValueError, match="test_fraction"):
        digits.digits_split(test_fraction=1.5)


def test_random_shift_translates_with_background_padding():
    x, _ = digits.load_digits()
    g = torch.Generator().manual_seed(0)
    out = data.random_shift(x[:1].expand(40, -1, -1, -1), 1, g)
    padded = torch.nn.functional.pad(x[:1], (1, 1, 1, 1), value=-1.0)[0]
    shifts = {(a, b): padded[:, a:a + 16, b:b + 16] for a in range(3) for b in range(3)}
    seen = set()
    for img in out:
        match = [k for k, v in shifts.items() if torch.equal(img, v)]
        assert match, "every output is a translate of the input"
        seen.add(match[0])
    assert len(seen) > 4
    assert torch.equal(data.random_shift(x[:3], 0, g), x[:3])


def test_edm_loss_is_edms_weighted_mse():
    class Zero(EDMPrecond):
        def forward(self, x, sigma, class_labels=None, force_fp32=False):
            return torch.zeros_like(x)

    y = digits.load_digits()[0][:8]
    d = Zero(lambda *a: None)
    loss = digits.edm_loss(d, y, generator=torch.Generator().manual_seed(3))
    # Same draws: sigma = exp(-1.2 + 1.2 u), lambda = (sigma^2 + 0.25) / (0.5 sigma)^2.
    u = torch.randn(8, generator=torch.Generator().manual_seed(3))
    sigma = (u * 1.2 - 1.2).exp()
    expected = (sigma ** 2 + 0.25) / (0.5 * sigma) ** 2 * y.square().flatten(1).mean(1)
    torch.testing.assert_close(loss, expected)
    with pytest.raises(ValueError, match="images"):
        digits.edm_loss(d, torch.zeros(3, 16))


def test_train_teacher_writes_a_loadable_teacher(tmp_path):
    out = tmp_path / "t.safetensors"
    s = digits.train_teacher(out, steps=3, batch_size=4, network=TINY, progress=False, log_every=1,
                             command="pid-fast train-teacher --steps 3")
    assert s["path"] == str(out) and len(s["history"]) == 3
    teacher = digits.load_digits_teacher(out)
    assert isinstance(teacher, EDMPrecond) and teacher.sigma_data == 0.5
    assert not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(2, 1, 16, 16)
    assert teacher(x, torch.tensor([1.0, 2.0])).shape == x.shape
    recipe = digits.checkpoint_recipe(out)
    assert recipe["command"] == "pid-fast train-teacher --steps 3" and recipe["steps"] == 3
    # The trainer takes it as an "edm" teacher.
    from pid_fast.train import build_teacher

    t2, net_cfg = build_teacher({"kind": "edm", "path": str(out)}, torch.device("cpu"))
    assert net_cfg["model_channels"] == 8
    # Deterministic for a seed.
    out2 = tmp_path / "t2.safetensors"
    digits.train_teacher(out2, steps=3, batch_size=4, network=TINY, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(out), load_file(out2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_teacher_schedules_are_edms():
    """EDM's EMA: half-life in images, ramped up as 0.1 x (images seen); Adam's lr ramps up linearly."""
    from pid_fast.demo.teacher import TeacherOptions

    opt = TeacherOptions(batch_size=64, lr=2e-3, ema_halflife_images=20000.0, ema_rampup_ratio=0.1,
                         lr_rampup_steps=200)
    assert opt.ema_rate(0) == pytest.approx(0.5 ** (64 / 6.4))            # after 64 images: half-life 6.4
    assert opt.ema_rate(9999) == pytest.approx(0.5 ** (64 / 20000.0))     # ramp-up over
    assert TeacherOptions(ema_rampup_ratio=None).ema_rate(0) == pytest.approx(0.5 ** (64 / 20000.0))
    assert opt.lr_at(0) == pytest.approx(1e-5) and opt.lr_at(199) == opt.lr_at(5000) == 2e-3
    with pytest.raises(ValueError, match="augment_shift"):
        TeacherOptions(augment_shift=-1)


def test_train_teacher_bad_input(tmp_path):
    with pytest.raises(ValueError, match="steps"):
        digits.train_teacher(tmp_path / "t", steps=0)
    with pytest.raises(ValueError, match="lr"):
        digits.train_teacher(tmp_path / "t", lr=-1.0)
    with pytest.raises(TypeError, match="network"):
        digits.train_teacher(tmp_path / "t", network="big")
    with pytest.raises(ValueError, match="in_channels"):
        digits.train_teacher(tmp_path / "t", steps=1, network={"in_channels": 3, "out_channels": 3})


def test_missing_files_name_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="pid-fast train-teacher"):
        digits.load_digits_teacher(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError, match="pid-fast train-features"):
        digits.load_classifier(tmp_path / "absent.safetensors")
    with pytest.raises(FileNotFoundError):
        digits.checkpoint_recipe(tmp_path / "absent.safetensors")


def test_classifier_train_load_and_format_check(tmp_path):
    out = tmp_path / "f.safetensors"
    s = digits.train_classifier(out, epochs=1, channels=4, feature_dim=8, progress=False)
    assert 0 <= s["test_accuracy"] <= 1
    model = digits.load_classifier(out)
    assert model.features(torch.zeros(3, 1, 16, 16)).shape == (3, 8)
    assert model(torch.zeros(3, 1, 16, 16)).shape == (3, 10)
    # A teacher file is not a classifier.
    t = tmp_path / "t.safetensors"
    digits.train_teacher(t, steps=1, batch_size=2, network=TINY, progress=False)
    with pytest.raises(ValueError, match="not a digits classifier"):
        digits.load_classifier(t)
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(ValueError, match="readable"):
        digits.load_classifier(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="resolution"):
        digits.DigitsClassifier(resolution=10)
    with pytest.raises(ValueError, match="epochs"):
        digits.train_classifier(out, epochs=0)


# ----------------------------------------------------------------------------------------
# The bundled files

needs_assets = pytest.mark.skipif(not (os.path.isfile(digits.DEFAULT_TEACHER) and os.path.isfile(digits.DEFAULT_FEATURES)),
                                  reason="bundled assets missing")


@needs_assets
def test_bundled_assets_are_small_and_documented():
    total = sum(os.path.getsize(p) for p in (digits.DEFAULT_TEACHER, digits.DEFAULT_FEATURES))
    assert total < 4 * 2 ** 20
    for path, kind in ((digits.DEFAULT_TEACHER, "digits-teacher"), (digits.DEFAULT_FEATURES, "digits-classifier")):
        recipe = digits.checkpoint_recipe(path)
        assert recipe["kind"] == kind and recipe["command"].startswith("pid-fast ")


@needs_assets
def test_bundled_classifier_is_accurate_on_held_out_digits():
    x, y = digits.load_digits()
    _, test = digits.digits_split()
    assert digits.classifier_accuracy(digits.load_classifier(), x[test], y[test]) > 0.95


@needs_assets
def test_bundled_teacher_denoises():
    """The teacher's D(y + sigma eps; sigma) is much closer to y than the noisy input, and
    beats the best constant (data-mean) guess at large sigma."""
    teacher = digits.load_digits_teacher()
    x, _ = digits.load_digits()
    y = x[torch.randperm(1797, generator=torch.Generator().manual_seed(0))[:256]]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for sigma in (0.1, 0.5, 2.0):
            noisy = y + sigma * torch.randn(y.shape, generator=g)
            mse = (teacher(noisy, sigma) - y).square().mean()
            assert float(mse) < 0.3 * sigma ** 2
        noisy = y + 10.0 * torch.randn(y.shape, generator=g)
        mse = (teacher(noisy, 10.0) - y).square().mean()
        assert float(mse) < float((x.mean(0, keepdim=True) - y).square().mean()) * 1.1


# ----------------------------------------------------------------------------------------
# CLI

def _cli():
    from pid_fast.cli import main  # the `pid-fast` group, with the eval commands registered

    return main


def test_cli_train_teacher_and_features(tmp_path):
    from click.testing import CliRunner

    out = tmp_path / "t.safetensors"
    res = CliRunner().invoke(_cli(), ["train-teacher", "--out", str(out), "--steps", "2", "--batch-size", "2",
                                      "--model-channels", "8", "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert "teacher:" in res.output and out.is_file()
    assert digits.checkpoint_recipe(out)["command"] == (
        f"pid-fast train-teacher --steps 2 --batch-size 2 --lr 0.002 --seed 0 --model-channels 8 --threads 1 "
        f"--out {out}")
    res = CliRunner().invoke(_cli(), ["train-teacher", "--out", str(out), "--steps", "1"])
    assert res.exit_code != 0 and "--overwrite" in res.output
    res = CliRunner().invoke(_cli(), ["train-teacher", "--out", str(out), "--steps", "0"])
    assert res.exit_code != 0 and "--steps" in res.output

    f = tmp_path / "f.safetensors"
    res = CliRunner().invoke(_cli(), ["train-features", "--out", str(f), "--epochs", "1", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "held-out accuracy" in res.output
    assert digits.checkpoint_recipe(f)["command"] == f"pid-fast train-features --epochs 1 --seed 0 --out {f}"
