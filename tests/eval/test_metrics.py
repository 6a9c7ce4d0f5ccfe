"""Metrics: clean-fid's Frechet distance / KID behind pid_fast.eval.metrics, the digits features,
the local-only Inception loader, reference statistics, image loading and `pid-fast fid`."""

import os

import numpy as np
import pytest
import torch
from torch import nn

from pid_fast.data.assets import DEFAULT_FEATURES
from pid_fast.data.digits import load_digits
from pid_fast.eval import metrics


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

needs_features = pytest.mark.skipif(not os.path.isfile(DEFAULT_FEATURES), reason="bundled feature net missing")


# ----------------------------------------------------------------------------------------
# Frechet distance and KID

def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    # FD(N(m1, diag s1^2), N(m2, diag s2^2)) = ||m1 - m2||^2 + sum (s1 - s2)^2
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = np.sum((m1 - m2) ** 2) + np.sum((s1 - s2) ** 2)
    got = metrics.frechet_distance(m1, np.diag(s1 ** 2), m2, np.diag(s2 ** 2))
    assert got == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_is_clean_fids():
    from cleanfid.fid import frechet_distance as cf

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 6)), rng.normal(0.3, 1.2, size=(400, 6))
    mu1, s1 = metrics.feature_statistics(a)
    mu2, s2 = metrics.feature_statistics(b)
    assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(float(cf(mu1, s1, mu2, s2)), rel=1e-12)
    assert metrics.fd_from_features(a, b) == pytest.approx(float(cf(mu1, s1, mu2, s2)), rel=1e-12)
    assert metrics.fd_from_features(a, (mu2, s2)) == pytest.approx(metrics.fd_from_features(a, b), rel=1e-12)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False))  # unbiased, as clean-fid


def test_fd_zero_for_identical_sets_and_grows_with_shift():
    rng = np.random.default_rng(2)
    a = rng.normal(size=(500, 8))
    assert abs(metrics.fd_from_features(a, a)) < 1e-6
    fds = [metrics.fd_from_features(a + d, a) for d in (0.1, 0.5, 1.0)]
    assert fds[0] < fds[1] < fds[2]
    assert fds[2] == pytest.approx(8 * 1.0 ** 2, rel=1e-6)  # a pure shift d: FD = dim * d^2


def test_fd_bad_input():
    with pytest.raises(ValueError, match="mu1, mu2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="sigma2"):
        metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ValueError, match="feats"):
        metrics.feature_statistics(np.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        metrics.feature_statistics(np.full((4, 2), np.nan))
    with pytest.raises(TypeError, match="feats"):
        metrics.feature_statistics([[1.0, 2.0]])


def test_kid_deterministic_restores_global_rng_and_orders_distributions():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(300, 6)), rng.normal(size=(300, 6))
    c = rng.normal(0.5, 1.0, size=(300, 6))
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    k1 = metrics.kernel_distance(a, b, num_subsets=20)
    after = np.random.random()
    assert before == after  # the global NumPy stream is untouched
    assert metrics.kernel_distance(a, b, num_subsets=20) == k1
    assert abs(k1) < metrics.kernel_distance(a, c, num_subsets=20)
    with pytest.raises(ValueError, match="feature dimensions"):
        metrics.kernel_distance(a, c[:, :3])
    with pytest.raises(ValueError, match="num_subsets"):
        metrics.kernel_distance(a, b, num_subsets=0)


# ----------------------------------------------------------------------------------------
# Digits features

@needs_features
def test_digits_fd_orders_degradations():
    images, _ = load_digits()
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(images.shape[0], generator=g)
    real = images[perm[:800]]
    fe = metrics.DigitsFeatures()
    fd_real = metrics.digits_fd(real, fe)
    fd_noisy = metrics.digits_fd(real + 0.3 * torch.randn(real.shape, generator=g), fe)
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1, count_include_pad=False)
    fd_blur = metrics.digits_fd(blurred, fe)
    fd_noise = metrics.digits_fd(torch.rand(real.shape, generator=g) * 2 - 1, fe)
    assert fd_real < fd_noisy < fd_noise
    assert fd_real < fd_blur < fd_noise
    fd, kid = metrics.digits_fd(real, fe, with_kid=True)
    assert fd == fd_real and np.isfinite(kid)


@needs_features
def test_digits_features_shape_and_bad_input():
    fe = metrics.DigitsFeatures()
    images, _ = load_digits()
    assert fe.features(images[:10]).shape == (10, 64)
    with pytest.raises(ValueError, match=r"\[B, 1, 16, 16\]"):
        fe.features(torch.zeros(2, 3, 16, 16))
    with pytest.raises(TypeError, match="uint8"):
        fe.features(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_missing_feature_net_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-features"):
        metrics.DigitsFeatures(tmp_path / "nope.safetensors")


# ----------------------------------------------------------------------------------------
# Inception: local file only

class _FakeInception(nn.Module):
    """Stands in for clean-fid's torchscript Inception: same call signature, `layers`
    attribute, [B, 2048] output (per-channel mean / min / max, tiled)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Identity()

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        f = torch.cat([x.mean(dim=(2, 3)), x.amin(dim=(2, 3)), x.amax(dim=(2, 3))], dim=1)
        return f.repeat(1, 228)[:, :2048]


@pytest.fixture
def fake_inception(tmp_path):
    path = tmp_path / "my-inception.pt"  # another name than clean-fid's: the loader links it
    torch.jit.script(_FakeInception()).save(str(path))
    return path


def test_inception_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        metrics.load_inception(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="inception-2015-12-05.pt"):
        metrics.load_inception(tmp_path)  # a folder without the file
    with pytest.raises(FileNotFoundError, match="no path given"):
        metrics.load_inception(None)
    bad = tmp_path / "garbage.pt"
    bad.write_bytes(b"not a torchscript file")
    with pytest.raises(ValueError, match="torchscript"):
        metrics.load_inception(bad)


def test_inception_features_protocol(fake_inception):
    fe = metrics.InceptionFeatures(fake_inception)
    x = torch.linspace(-1, 1, 2 * 16).reshape(2, 1, 4, 4)
    f = fe(x)
    assert f.shape == (2, 2048)
    # grey -> 3 identical channels; [-1, 1] -> [0, 255] unquantised (no rounding).
    expected_mean = ((x + 1) * 127.5).mean(dim=(1, 2, 3))
    torch.testing.assert_close(f[:, :3], expected_mean[:, None].expand(2, 3))
    assert float(f[0, 3]) == 0.0 and float(f[1, 8]) == 255.0
    with pytest.raises(ValueError, match="1 or 3 channels"):
        fe(torch.zeros(1, 2, 4, 4))


# ----------------------------------------------------------------------------------------
# Reference statistics and images

def test_reference_stats_round_trip_and_errors(tmp_path):
    feats = np.random.default_rng(4).normal(size=(50, 3))
    mu, sigma = metrics.save_reference_stats(tmp_path / "ref.npz", feats)
    mu2, sigma2 = metrics.load_reference_stats(tmp_path / "ref.npz")
    np.testing.assert_array_equal(mu, mu2)
    np.testing.assert_array_equal(sigma, sigma2)
    with pytest.raises(FileNotFoundError, match="reference statistics"):
        metrics.load_reference_stats(tmp_path / "absent.npz")
    np.savez(tmp_path / "wrong.npz", mean=mu)
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        metrics.load_reference_stats(tmp_path / "wrong.npz")
    (tmp_path / "broken.npz").write_bytes(b"nonsense")
    with pytest.raises(ValueError, match="readable"):
        metrics.load_reference_stats(tmp_path / "broken.npz")


def test_load_images_folder_and_npz(tmp_path):
    from PIL import Image

    imgs = (np.arange(3 * 4 * 4) * 5 % 256).astype(np.uint8).reshape(3, 4, 4)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f"{k:03d}.png")
    x = metrics.load_images(folder)
    assert x.shape == (3, 1, 4, 4)
    torch.testing.assert_close(x[:, 0], torch.from_numpy(imgs).float() / 127.5 - 1)
    assert metrics.load_images(folder, num=2).shape[0] == 2

    np.savez(tmp_path / "u8.npz", images=imgs[..., None].repeat(3, -1))
    assert metrics.load_images(tmp_path / "u8.npz").shape == (3, 3, 4, 4)
    xf = np.random.default_rng(5).uniform(-1, 1, size=(2, 3, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "float.npz", x=xf, images=np.zeros((2, 4, 4, 3), np.uint8))
    torch.testing.assert_close(metrics.load_images(tmp_path / "float.npz"), torch.from_numpy(xf))  # 'x' preferred

    np.savez(tmp_path / "other.npz", y=xf)
    with pytest.raises(ValueError, match="'x'"):
        metrics.load_images(tmp_path / "other.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        metrics.load_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError):
        metrics.load_images(tmp_path / "absent")
    with pytest.raises(ValueError, match="num"):
        metrics.load_images(folder, num=0)


# ----------------------------------------------------------------------------------------
# `pid-fast fid`

def _cli():
    from pid_fast.cli import main  # the `pid-fast` group, with the eval commands registered

    return main


def _write_digits_folder(folder, n=300):
    from PIL import Image

    images, _ = load_digits()
    folder.mkdir()
    u8 = ((images[:n, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    for k, im in enumerate(u8):
        Image.fromarray(im).save(folder / f"{k:04d}.png")


@needs_features
def test_cli_fid_digits_features(tmp_path):
    from click.testing import CliRunner

    _write_digits_folder(tmp_path / "real")
    res = CliRunner().invoke(_cli(), ["fid", str(tmp_path / "real"), "--features", "digits", "--kid",
                                      "--save-stats", str(tmp_path / "stats.npz")])
    assert res.exit_code == 0, res.output
    assert "digits FD vs the 1797 digits" in res.output and "KID" in res.output
    assert os.path.isfile(tmp_path / "stats.npz")
    # Against its own statistics the distance is ~0.
    res = CliRunner().invoke(_cli(), ["fid", str(tmp_path / "real"), "--features", "digits",
                                      "--ref", str(tmp_path / "stats.npz")])
    assert res.exit_code == 0, res.output
    assert abs(float(res.output.strip().split()[-1])) < 1e-3


def test_cli_fid_inception_without_weights_fails_clearly(tmp_path):
    from click.testing import CliRunner

    (tmp_path / "imgs").mkdir()
    res = CliRunner().invoke(_cli(), ["fid", str(tmp_path / "imgs"), "--ref", "x.npz"])
    assert res.exit_code != 0
    assert "inception-2015-12-05.pt" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(_cli(), ["fid", str(tmp_path / "imgs"), "--inception", str(tmp_path / "no.pt"),
                                      "--ref", "x.npz"])
    assert res.exit_code != 0 and "no such file" in res.output


def test_cli_fid_checkpoint_with_local_inception(tmp_path, fake_inception):
    """A `pid-fast distill` run folder as SOURCE: its one-step samples are generated and scored."""
    from click.testing import CliRunner

    from pid_fast.train import train

    cfg = {"device": "cpu", "teacher": {"kind": "gaussian", "mean": 0.0, "std": 0.5},
           "student": {"init": "random", "network": {"name": "tiny-ddpmpp", "model_channels": 8,
                                                      "channel_mult": [1], "attn_resolutions": []}},
           "batch_size": 4, "total_steps": 1, "checkpoint_every": 1, "snapshot_every": 0, "progress": False}
    train(cfg, tmp_path / "run")
    ref = np.random.default_rng(6).normal(size=(40, 2048))
    # Statistics only (a 2048-d FD costs scipy's sqrtm tens of seconds on 2 cores; the
    # distance itself is tested above on smaller features).
    res = CliRunner().invoke(_cli(), ["fid", str(tmp_path / "run"), "--inception", str(fake_inception),
                                      "--num", "6", "--batch", "4", "--save-stats", str(tmp_path / "gen.npz")])
    assert res.exit_code == 0, res.output
    assert "generating 6 one-step samples" in res.output and "2048-d inception features" in res.output
    mu, sigma = metrics.load_reference_stats(tmp_path / "gen.npz")
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.isfinite(mu).all()
    # Statistics of another dimension are refused with a message, not a traceback.
    metrics.save_reference_stats(tmp_path / "ref64.npz", ref[:, :64])
    res = CliRunner().invoke(_cli(), ["fid", str(tmp_path / "run"), "--inception", str(fake_inception),
                                      "--ref", str(tmp_path / "ref64.npz"), "--num", "4"])
    assert res.exit_code != 0 and "64-d" in res.output


def test_teacher_distance_is_zero_for_the_teacher_and_pairs_samples_by_noise():
    """TeacherDistance: the FD between two sample sets and the per-pixel RMSE between the pairs
    from the same noise (0 for the teacher's own samples); LPIPS when a per-sample norm is given."""
    extractor = metrics.DigitsFeatures(DEFAULT_FEATURES)
    teacher, _ = load_digits()
    teacher = teacher[:200]
    shifted = torch.roll(teacher, 1, dims=-1)
    calls = []

    def fake_lpips(a, b):  # a per-sample distance (B,), as LPIPSNorm returns
        calls.append(a.shape[0])
        return (a - b).abs().flatten(1).mean(1)

    distance = metrics.TeacherDistance(teacher, extractor, batch=64, lpips=fake_lpips)
    own = distance(teacher)
    assert own["fd_teacher"] == pytest.approx(0.0, abs=1e-6) and own["rmse_teacher"] == 0.0
    assert own["lpips_teacher"] == 0.0 and calls == [64, 64, 64, 8]
    other = distance(shifted)
    assert other["rmse_teacher"] == pytest.approx(float((shifted - teacher).square().mean().sqrt()), rel=1e-6)
    assert other["lpips_teacher"] == pytest.approx(float((shifted - teacher).abs().mean()), rel=1e-6)
    feats = metrics.features_of(extractor, shifted)
    assert other["fd_teacher"] == pytest.approx(metrics.fd_from_features(feats, metrics.features_of(extractor, teacher)),
                                                rel=1e-9)
    assert other["fd_teacher"] > 0.01
    # Pairs by order: the same images in another order are as far in FD (0) but not per sample.
    permuted = teacher[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    moved = distance(permuted)
    assert moved["fd_teacher"] == pytest.approx(0.0, abs=1e-6) and moved["rmse_teacher"] > 0.1
    with pytest.raises(ValueError, match="images: 199 samples"):
        distance(teacher[:199])
    with pytest.raises(ValueError, match="reference: expected one image per image"):
        metrics.rmse_to_reference(teacher[:3], teacher[:4])
    with pytest.raises(TypeError, match="teacher_images"):
        metrics.TeacherDistance(teacher.numpy(), extractor)
