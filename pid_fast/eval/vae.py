"""Latent teachers: decoding a student's latent samples to images through a VAE read from a local
folder (diffusers' AutoencoderKL, `from_pretrained(path, local_files_only=True)`; nothing is
downloaded).

EDM2's ImageNet-512 models (edm2-img512-*) denoise 4x64x64 latents of Stability's VAE
(stabilityai/sd-vae-ft-mse). EDM2 (training/encoders.py, StabilityVAEEncoder) maps the VAE's
"raw" latents to the model's "final" latents per channel,

    final = (raw - raw_mean) * final_std / raw_std + final_mean = scale * raw + bias,

with raw_mean (5.81, 3.25, 0.12, -2.15), raw_std (4.17, 4.62, 3.71, 3.28), final_mean 0,
final_std 0.5 by default; EDM2's train_edm2.py passes no encoder arguments, so its latent models
use these. Decoding inverts the map, raw = (final - bias) / scale, and runs vae.decode(raw).
EDM2 gives the VAE images in [0, 1] (not [-1, 1] as Stable Diffusion does) and reads its output
clamped to [0, 1]; `LatentDecoder` does the same and returns 2 x - 1, pid_fast's [-1, 1] image
range. The VAE's own `scaling_factor` (0.18215, Stable Diffusion's) plays no part in EDM2.

A snapshot converted by pid_fast.io records its encoder's scale and bias under
config['encoder'] ({'kind': 'stability-vae', 'scale', 'bias'}); `LatentDecoder.from_path(path,
encoder=config['encoder'])` uses them, and EDM2's defaults otherwise.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["EDM2_RAW_MEAN", "EDM2_RAW_STD", "latent_scaling", "scaling_from_encoder", "load_vae", "LatentDecoder",
           "ScaledLatentDecoder", "student_decoder"]

EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)


def latent_scaling(raw_mean: Sequence[float] = EDM2_RAW_MEAN, raw_std: Sequence[float] = EDM2_RAW_STD,
                   final_mean: float = 0.0, final_std: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias), each [C] float32, of final = scale * raw + bias (EDM2's float32 arithmetic)."""
    raw_mean = torch.as_tensor(list(raw_mean), dtype=torch.float32)
    raw_std = torch.as_tensor(list(raw_std), dtype=torch.float32)
    if raw_mean.shape != raw_std.shape or raw_std.ndim != 1 or not bool((raw_std > 0).all()):
        raise ValueError(f"latent_scaling: raw_mean and raw_std must be equal-length lists with raw_std > 0, "
                         f"got {raw_mean.tolist()} and {raw_std.tolist()}")
    if not final_std > 0:
        raise ValueError(f"latent_scaling: final_std must be positive, got {final_std!r}")
    scale = torch.tensor(final_std, dtype=torch.float32) / raw_std
    bias = torch.tensor(final_mean, dtype=torch.float32) - raw_mean * scale
    return scale, bias


def scaling_from_encoder(encoder: Optional[Mapping[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, bias) from a converted snapshot's config['encoder'] (EDM2's defaults for None)."""
    if encoder is None:
        return latent_scaling()
    if not isinstance(encoder, Mapping) or encoder.get("kind") != "stability-vae":
        kind = encoder.get("kind") if isinstance(encoder, Mapping) else type(encoder).__name__
        raise ValueError(f"encoder: only a 'stability-vae' encoder has a latent scaling, got {kind!r}")
    scale = torch.as_tensor(encoder["scale"], dtype=torch.float32).reshape(-1)
    bias = torch.as_tensor(encoder["bias"], dtype=torch.float32).reshape(-1)
    if scale.shape != bias.shape or not bool((scale != 0).all()):
        raise ValueError("encoder: 'scale' and 'bias' must be equal-length lists with non-zero scales")
    return scale, bias


def load_vae(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """A frozen, eval-mode diffusers AutoencoderKL from a local folder (save_pretrained's layout)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"vae: no such folder: {path!r} (a diffusers AutoencoderKL saved with "
                                f"save_pretrained, e.g. a local copy of stabilityai/sd-vae-ft-mse)")
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise ImportError("decoding latents needs diffusers (not installed): pip install 'pid_fast[diffusers]'") \
            from None
    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    return vae.eval().requires_grad_(False).to(device)


class LatentDecoder:
    """Final latents [B, C, H, W] -> images [B, 3, H*f, W*f] in [-1, 1] (float32, on the latents'
    device), through `vae` in batches of `batch_size` (EDM2's decode; see the module docstring)."""

    def __init__(self, vae: nn.Module, scale: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                 batch_size: int = 8):
        if (scale is None) != (bias is None):
            raise ValueError("LatentDecoder: give both scale and bias, or neither (EDM2's defaults)")
        if scale is None:
            scale, bias = latent_scaling()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"LatentDecoder: batch_size must be a positive int, got {batch_size!r}")
        channels = getattr(getattr(vae, "config", None), "latent_channels", None)
        if channels is not None and channels != scale.numel():
            raise ValueError(f"LatentDecoder: the VAE has {channels} latent channels but the scaling has "
                             f"{scale.numel()}")
        self.vae, self.batch_size = vae, batch_size
        self.scale = torch.as_tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.bias = torch.as_tensor(bias, dtype=torch.float32).reshape(1, -1, 1, 1)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                  encoder: Optional[Mapping[str, Any]] = None, batch_size: int = 8) -> "LatentDecoder":
        """A decoder with the VAE of a local folder and the scaling of `encoder` (EDM2's defaults for None)."""
        scale, bias = scaling_from_encoder(encoder)
        return cls(load_vae(path, device), scale, bias, batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.scale.shape[1]:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"LatentDecoder: expected latents [B, {self.scale.shape[1]}, H, W], got {got}")
        latents = latents.to(torch.float32)
        raw = (latents - self.bias.to(latents.device)) / self.scale.to(latents.device)
        dtype = next(self.vae.parameters()).dtype
        images = [self.vae.decode(chunk.to(dtype)).sample.to(torch.float32) for chunk in raw.split(self.batch_size)]
        return torch.cat(images).clamp(0, 1) * 2 - 1


class ScaledLatentDecoder:
    """Latents of a Stable-Diffusion-style pipeline [B, C, H, W] -> images [B, 3, H*f, W*f] in
    [-1, 1] (float32, on the latents' device), as diffusers' pipelines decode:
    vae.decode(latents / scaling_factor + shift_factor).sample, clamped to [-1, 1] (the VAE's own
    config gives scaling_factor and, for SD3/Flux VAEs, shift_factor)."""

    def __init__(self, vae: nn.Module, batch_size: int = 8):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"ScaledLatentDecoder: batch_size must be a positive int, got {batch_size!r}")
        config = getattr(vae, "config", None)
        if config is None or getattr(config, "scaling_factor", None) is None:
            raise ValueError("ScaledLatentDecoder: the VAE's config has no scaling_factor")
        self.vae, self.batch_size = vae, batch_size
        self.scaling_factor = float(config.scaling_factor)
        self.shift_factor = float(getattr(config, "shift_factor", None) or 0.0)
        self.channels = int(config.latent_channels)

    @classmethod
    def from_path(cls, path: str | os.PathLike, device: str | torch.device = "cpu",
                  batch_size: int = 8) -> "ScaledLatentDecoder":
        return cls(load_vae(path, device), batch_size=batch_size)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> torch.Tensor:
        if not isinstance(latents, torch.Tensor) or latents.ndim != 4 or latents.shape[1] != self.channels:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"ScaledLatentDecoder: expected latents [B, {self.channels}, H, W], got {got}")
        raw = latents.to(torch.float32) / self.scaling_factor + self.shift_factor
        dtype = next(self.vae.parameters()).dtype
        images = [self.vae.decode(chunk.to(dtype)).sample.to(torch.float32) for chunk in raw.split(self.batch_size)]
        return torch.cat(images).clamp(-1, 1)


def student_decoder(path: str | os.PathLike, net: nn.Module, device: str | torch.device = "cpu"):
    """The decoder of a latent student's samples through the VAE folder ``path`` (`--vae`): a
    diffusers network's (e.g. a DiT's) latents as its pipeline decodes them (``ScaledLatentDecoder``,
    the VAE's scaling_factor), any other's with EDM2's latent scaling (``LatentDecoder``)."""
    from pid_fast.models.diffusers_adapter import DiffusersUNet

    if isinstance(net, DiffusersUNet):
        return ScaledLatentDecoder.from_path(path, device=device)
    return LatentDecoder.from_path(path, device=device)
