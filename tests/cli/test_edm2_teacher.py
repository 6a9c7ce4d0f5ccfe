"""EDM2 teachers end to end: a tiny EDM2 teacher saved as a synthetic EDM2 snapshot ->
`pid-fast distill` (teacher kind "edm") -> `pid-fast sample` -> `pid-fast fid --features digits`;
and a latent EDM2 teacher whose samples are decoded by a tiny random VAE (`fid --vae`,
pid_fast.eval.vae)."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "io"))  # the EDM fakes
from edm_fakes import edm2_snapshot, hostile_source, make_edm2_teacher, sha256, stability_encoder  # noqa: E402

from pid_fast.cli import main  # noqa: E402
from pid_fast.demo.digits import DEFAULT_FEATURES  # noqa: E402
from pid_fast.io import edm_sources  # noqa: E402
from pid_fast.train import generate, load_student  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Digits-shaped (1 x 16 x 16) so the bundled digits feature net can score the samples.
PIXEL = dict(model_type="EDM2UNet", img_resolution=16, in_channels=1, out_channels=1, label_dim=0, model_channels=8,
             channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), channels_per_head=8)
# 4 x 8 x 8 latents, decoded to 1 x 16 x 16 images by the tiny VAE below.
LATENT = dict(PIXEL, img_resolution=8, in_channels=4, out_channels=4, attn_resolutions=(4,))


@pytest.fixture
def snapshot(tmp_path, monkeypatch):
    """snapshot(cfg, **kw): the path of a synthetic EDM2 snapshot of a random tiny teacher."""
    marker = tmp_path / "executed.txt"
    monkeypatch.setitem(edm_sources.KNOWN_EDM2_SOURCES, sha256(hostile_source(marker)), "tests: synthetic EDM2")

    def write(cfg, **kwargs):
        path = tmp_path / "teacher.pkl"
        path.write_bytes(edm2_snapshot(make_edm2_teacher(cfg), cfg, marker, **kwargs))
        return path

    yield write
    assert not marker.exists()


def distill(tmp_path, teacher_path, steps=4):
    cfg = {"device": "cpu", "teacher": {"kind": "edm", "path": str(teacher_path)}, "student": {"init": "teacher"},
           "batch_size": 4, "total_steps": steps, "log_every": 2, "checkpoint_every": steps, "snapshot_every": 0,
           "progress": False, "ema_rates": [0.5], "optimizer": {"lr": 1e-3}, "loss": {"N": 20}}
    cfg_path, run = tmp_path / "config.json", tmp_path / "run"
    cfg_path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(main, ["distill", "--config", str(cfg_path), "--run-dir", str(run)])
    assert res.exit_code == 0, res.output
    return run


@pytest.mark.skipif(not os.path.isfile(DEFAULT_FEATURES), reason="bundled feature net missing")
def test_edm2_teacher_distill_sample_fid(tmp_path, snapshot):
    run = distill(tmp_path, snapshot(PIXEL))
    with open(run / "log.jsonl") as f:
        losses = [row["loss"] for row in map(json.loads, f) if "loss" in row]
    assert losses and all(np.isfinite(losses))
    net, meta = load_student(run, weights="model")
    assert type(net).__name__ == "EDM2UNet" and meta["shape"] == [1, 16, 16]
    res = CliRunner().invoke(main, ["sample", str(run), str(tmp_path / "s.npz"), "--num", "6", "--weights", "model"])
    assert res.exit_code == 0, res.output
    x = np.load(tmp_path / "s.npz")["x"]
    assert x.shape == (6, 1, 16, 16) and np.isfinite(x).all() and x.std() > 0
    res = CliRunner().invoke(main, ["fid", str(run), "--features", "digits", "--num", "40", "--batch", "20"])
    assert res.exit_code == 0, res.output
    assert "digits FD vs the 1797 digits:" in res.output


def tiny_vae(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=16)
    vae.save_pretrained(path)
    return vae.eval()


@pytest.mark.skipif(not os.path.isfile(DEFAULT_FEATURES), reason="bundled feature net missing")
def test_latent_edm2_teacher_decodes_through_the_vae(tmp_path, snapshot):
    pytest.importorskip("diffusers")
    from pid_fast.eval.vae import LatentDecoder, latent_scaling

    vae = tiny_vae(tmp_path / "vae")
    run = distill(tmp_path, snapshot(LATENT, encoder=stability_encoder()))
    net, meta = load_student(run, weights="model")
    assert meta["shape"] == [4, 8, 8]
    decoder = LatentDecoder.from_path(tmp_path / "vae")
    images, _ = generate(net, meta, range(3), decode=decoder)
    latents, _ = generate(net, meta, range(3), decode=lambda z: z)  # the raw, unclamped latents
    assert images.shape == (3, 1, 16, 16) and float(images.min()) >= -1 and float(images.max()) <= 1
    assert float(latents.abs().max()) > 1  # not clamped to the image range
    scale, bias = latent_scaling()
    with torch.no_grad():  # EDM2's decode: raw = (final - bias) / scale; VAE output in [0, 1] -> [-1, 1]
        expected = vae.decode((latents - bias.reshape(1, 4, 1, 1)) / scale.reshape(1, 4, 1, 1)).sample
    torch.testing.assert_close(images, expected.clamp(0, 1) * 2 - 1, atol=1e-5, rtol=1e-5)
    res = CliRunner().invoke(main, ["fid", str(run), "--features", "digits", "--num", "20", "--batch", "10",
                                    "--vae", str(tmp_path / "vae")])
    assert res.exit_code == 0, res.output
    assert "digits FD vs the 1797 digits:" in res.output
    res = CliRunner().invoke(main, ["fid", str(run), "--features", "digits", "--all-checkpoints",
                                    "--vae", str(tmp_path / "vae")])
    assert res.exit_code != 0 and "--vae" in res.output
    out = tmp_path / "samples.npz"
    res = CliRunner().invoke(main, ["sample", str(run), str(out), "--num", "3", "--weights", "model",
                                    "--vae", str(tmp_path / "vae")])
    assert res.exit_code == 0, res.output
    torch.testing.assert_close(torch.from_numpy(np.load(out)["x"]), images, atol=1e-5, rtol=1e-5)
