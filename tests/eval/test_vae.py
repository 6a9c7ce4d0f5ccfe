"""Decoding latent samples through a VAE from a local folder (pid_fast/eval/vae.py), with EDM2's
latent scaling; a tiny random diffusers AutoencoderKL saved to tmp_path."""

import numpy as np
import pytest
import torch

from pid_fast.eval.vae import EDM2_RAW_MEAN, EDM2_RAW_STD, LatentDecoder, latent_scaling, load_vae, scaling_from_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                                  layers_per_block=1, latent_channels=4, norm_num_groups=4, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_latent_scaling_is_edm2s_float32_arithmetic():
    scale, bias = latent_scaling()
    ref_scale = np.float32(0.5) / np.float32(EDM2_RAW_STD)  # EDM2's StabilityVAEEncoder.__init__
    ref_bias = np.float32(0) - np.float32(EDM2_RAW_MEAN) * ref_scale
    assert scale.tolist() == ref_scale.tolist() and bias.tolist() == ref_bias.tolist()
    raw = torch.randn(2, 4, 3, 3)
    final = raw * scale.reshape(1, 4, 1, 1) + bias.reshape(1, 4, 1, 1)
    torch.testing.assert_close((final - bias.reshape(1, 4, 1, 1)) / scale.reshape(1, 4, 1, 1), raw)
    enc = {"kind": "stability-vae", "scale": [1.0, 2.0], "bias": [0.0, -1.0]}
    assert [t.tolist() for t in scaling_from_encoder(enc)] == [[1.0, 2.0], [0.0, -1.0]]
    assert all(torch.equal(a, b) for a, b in zip(scaling_from_encoder(None), (scale, bias)))
    with pytest.raises(ValueError, match="stability-vae"):
        scaling_from_encoder({"kind": "rgb"})
    with pytest.raises(ValueError, match="raw_std"):
        latent_scaling(raw_std=(1.0, 0.0, 1.0, 1.0))


def test_decoder_is_edm2s_decode_in_batches(vae_dir):
    vae = load_vae(vae_dir)
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    latents = torch.randn(5, 4, 8, 8) * 0.5
    images = LatentDecoder(vae, batch_size=2)(latents)
    scale, bias = latent_scaling()
    with torch.no_grad():
        raw = (latents - bias.reshape(1, 4, 1, 1)) / scale.reshape(1, 4, 1, 1)
        expected = vae.decode(raw).sample.clamp(0, 1) * 2 - 1
    assert images.shape == (5, 3, 16, 16) and images.dtype == torch.float32
    torch.testing.assert_close(images, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(LatentDecoder.from_path(vae_dir, batch_size=8)(latents), images, atol=1e-5, rtol=1e-5)


def test_decoder_errors(vae_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="AutoencoderKL"):
        load_vae(tmp_path / "missing")
    vae = load_vae(vae_dir)
    with pytest.raises(ValueError, match="4 latent channels"):
        LatentDecoder(vae, torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="both scale and bias"):
        LatentDecoder(vae, torch.ones(4))
    with pytest.raises(ValueError, match=r"latents \[B, 4, H, W\]"):
        LatentDecoder(vae)(torch.zeros(2, 3, 8, 8))
