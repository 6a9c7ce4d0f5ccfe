"""Networks by name: EDM's U-Nets (Karras et al. 2022), SongUNet (DDPM++ / NCSN++) and
DhariwalUNet (ADM), and EDM2's U-Net (Karras et al. 2024, edm2.py), as plain config dicts, and the
builder. The layers are in layers.py, the U-Nets in unets.py and edm2.py (re-exported here).

The modules below are an independent implementation whose parameter and buffer names,
shapes and registration rules follow NVlabs/edm `training/networks.py`, so that the
state_dict of an EDM checkpoint (after `pid_fast.io` strips the `model.`
prefix and drops the `map_augment` keys) loads with `strict=True`.

A network is the raw function F(x_in, c_noise, class_labels) of a diffusion model; the
preconditioning (c_skip, c_out, c_in, c_noise) lives in `pid_fast.models.preconditioning`.

Weights are stored in fp32 and cast to the activation dtype inside each layer, so the
same module runs in fp32 or fp16 (EDM's `use_fp16`) without a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Mapping

import torch
from torch import nn

from pid_fast.models.layers import (Conv2d, FourierEmbedding, GroupNorm, Linear,  # noqa: F401
                                    PositionalEmbedding, UNetBlock, weight_init)
from pid_fast.models.edm2 import EDM2UNet
from pid_fast.models.preconditioning import PRECONDITIONINGS, Preconditioning
from pid_fast.models.unets import DhariwalUNet, SongUNet

__all__ = [
    "weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
    "FourierEmbedding", "SongUNet", "DhariwalUNet", "EDM2UNet", "NETWORK_CONFIGS", "MODEL_TYPES",
    "network_config", "build_network", "build_denoiser", "count_parameters",
]

# ----------------------------------------------------------------------------------------
# Named configurations (plain dicts: `model_type` + the constructor's keyword arguments).

MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet, "EDM2UNet": EDM2UNet}

_DDPMPP = dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
               decoder_type="standard", channel_mult_noise=1, resample_filter=(1, 1))
_NCSNPP = dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
               decoder_type="standard", channel_mult_noise=2, resample_filter=(1, 3, 3, 1))

NETWORK_CONFIGS: dict[str, dict[str, Any]] = {
    # EDM's CIFAR-10 teachers (train.py --arch=ddpmpp / ncsnpp, dropout 0.13).
    "cifar10-ddpmpp": dict(_DDPMPP, img_resolution=32, in_channels=3, out_channels=3, label_dim=0,
                           model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                           attn_resolutions=(16,), dropout=0.13),
    "cifar10-ddpmpp-cond": dict(_DDPMPP, img_resolution=32, in_channels=3, out_channels=3, label_dim=10,
                                model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                                attn_resolutions=(16,), dropout=0.13),
    "cifar10-ncsnpp": dict(_NCSNPP, img_resolution=32, in_channels=3, out_channels=3, label_dim=0,
                           model_channels=128, channel_mult=(2, 2, 2), channel_mult_emb=4, num_blocks=4,
                           attn_resolutions=(16,), dropout=0.13),
    # EDM's ImageNet-64 teacher (train.py --arch=adm, dropout 0.10, 1000 classes).
    "imagenet64-adm": dict(model_type="DhariwalUNet", img_resolution=64, in_channels=3, out_channels=3,
                           label_dim=1000, model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_emb=4,
                           num_blocks=3, attn_resolutions=(32, 16, 8), dropout=0.10),
    # Small configurations for tests and the CPU demo (8x8 images, about 0.18M parameters).
    "tiny-ddpmpp": dict(_DDPMPP, img_resolution=8, in_channels=3, out_channels=3, label_dim=0,
                        model_channels=16, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                        attn_resolutions=(4,), dropout=0.0),
    "tiny-ncsnpp": dict(_NCSNPP, img_resolution=8, in_channels=3, out_channels=3, label_dim=0,
                        model_channels=16, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                        attn_resolutions=(4,), dropout=0.0),
    "tiny-adm": dict(model_type="DhariwalUNet", img_resolution=8, in_channels=3, out_channels=3, label_dim=10,
                     model_channels=16, channel_mult=(1, 2), channel_mult_emb=2, num_blocks=1,
                     attn_resolutions=(4,), dropout=0.0, channels_per_head=16),
}
NETWORK_CONFIGS["cifar10-ddpmpp-uncond"] = NETWORK_CONFIGS["cifar10-ddpmpp"]

# EDM2's networks (Karras et al. 2024, config G; NVlabs/edm2 train_edm2.py presets): one
# architecture, channel_mult (1, 2, 3, 4), 3 blocks per level, attention at 16x16 and 8x8, 1000
# ImageNet classes; the sizes differ in model_channels and dropout. img64: RGB pixels; img512:
# 4-channel 64x64 latents of Stability's VAE (pid_fast.eval.vae decodes them).
_EDM2 = dict(model_type="EDM2UNet", img_resolution=64, label_dim=1000, channel_mult=(1, 2, 3, 4), num_blocks=3,
             attn_resolutions=(16, 8))
_EDM2_SIZES = {"xxs": (64, 0.0), "xs": (128, 0.0), "s": (192, 0.0), "m": (256, 0.1), "l": (320, 0.1),
               "xl": (384, 0.1), "xxl": (448, 0.1)}
for _size, (_channels, _dropout) in _EDM2_SIZES.items():
    if _size not in ("xxs", "xxl"):  # EDM2's img64 presets: xs .. xl
        NETWORK_CONFIGS[f"edm2-img64-{_size}"] = dict(_EDM2, in_channels=3, out_channels=3, model_channels=_channels,
                                                      dropout=_dropout)
    NETWORK_CONFIGS[f"edm2-img512-{_size}"] = dict(_EDM2, in_channels=4, out_channels=4, model_channels=_channels,
                                                   dropout=_dropout)
# A small EDM2 for tests and CPU runs (8x8 RGB, unconditional).
NETWORK_CONFIGS["tiny-edm2"] = dict(model_type="EDM2UNet", img_resolution=8, in_channels=3, out_channels=3,
                                    label_dim=0, model_channels=16, channel_mult=(1, 2), num_blocks=1,
                                    attn_resolutions=(4,), channels_per_head=16, dropout=0.0)


def network_config(name: str, **overrides: Any) -> dict[str, Any]:
    """A copy of the named configuration with `overrides` applied."""
    if not isinstance(name, str) or name not in NETWORK_CONFIGS:
        raise ValueError(f"network_config: unknown name {name!r}; available: {sorted(NETWORK_CONFIGS)}")
    config = copy.deepcopy(NETWORK_CONFIGS[name])
    config.update(overrides)
    return config


def build_network(config: str | Mapping[str, Any], device: torch.device | str | None = None,
                  **overrides: Any) -> nn.Module:
    """Instantiate a network from a config dict (`model_type` + constructor kwargs) or a
    name in NETWORK_CONFIGS. `device="meta"` builds it without allocating memory."""
    if isinstance(config, str):
        config = network_config(config)
    elif not isinstance(config, Mapping):
        raise TypeError(f"build_network: config must be a name or a mapping, got {type(config).__name__}")
    kwargs = dict(config)
    kwargs.update(overrides)
    model_type = kwargs.pop("model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"build_network: config['model_type'] must be one of {sorted(MODEL_TYPES)}, "
                         f"got {model_type!r}")
    with torch.device(device) if device is not None else contextlib.nullcontext():
        try:
            return MODEL_TYPES[model_type](**kwargs)
        except TypeError as exc:  # unknown keyword in the config
            raise ValueError(f"build_network: invalid config for {model_type}: {exc}") from exc


def count_parameters(module: nn.Module) -> int:
    """Number of scalar parameters (buffers excluded)."""
    return sum(p.numel() for p in module.parameters())


def build_denoiser(config: Mapping[str, Any], device: torch.device | str | None = None) -> Preconditioning:
    """A preconditioned network from a teacher config
    {'precond': 'edm'|'vp'|'ve', 'use_fp16': ..., <precond kwargs>, 'network': {network config}},
    the format written by `pid_fast.io`. Weights are freshly initialised."""
    if not isinstance(config, Mapping):
        raise TypeError(f"build_denoiser: config must be a mapping, got {type(config).__name__}")
    config = dict(config)
    name = config.pop("precond", None)
    if name not in PRECONDITIONINGS:
        raise ValueError(f"build_denoiser: config['precond'] must be one of {sorted(PRECONDITIONINGS)}, "
                         f"got {name!r}")
    network = config.pop("network", None)
    if not isinstance(network, Mapping):
        raise ValueError("build_denoiser: config['network'] must be a network config mapping")
    model = build_network(network, device=device)
    try:
        return PRECONDITIONINGS[name](model, label_dim=int(network.get("label_dim", 0)), **config)
    except TypeError as exc:
        raise ValueError(f"build_denoiser: invalid options for precond {name!r}: {exc}") from exc
