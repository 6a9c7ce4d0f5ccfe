"""U-Net architectures of EDM (Karras et al. 2022): SongUNet (DDPM++ / NCSN++) and
DhariwalUNet (ADM).

The modules below are an independent implementation whose parameter and buffer names,
shapes and registration rules follow NVlabs/edm `training/networks.py`, so that the
state_dict of an EDM checkpoint (after `pid_fast.io.edm_checkpoint` strips the `model.`
prefix and drops the `map_augment` keys) loads with `strict=True`.

A network is the raw function F(x_in, c_noise, class_labels) of a diffusion model; the
preconditioning (c_skip, c_out, c_in, c_noise) lives in `pid_fast.models.preconditioning`.

Weights are stored in fp32 and cast to the activation dtype inside each layer, so the
same module runs in fp32 or fp16 (EDM's `use_fp16`) without a second copy of the weights.
"""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
    "FourierEmbedding", "SongUNet", "DhariwalUNet", "NETWORK_CONFIGS", "MODEL_TYPES",
    "network_config", "build_network", "count_parameters",
]

# ----------------------------------------------------------------------------------------
# Weight initialisation. The variance of each mode follows its usual definition:
#   xavier_uniform:  U(-a, a) with a = sqrt(6 / (fan_in + fan_out))
#   xavier_normal:   N(0, 2 / (fan_in + fan_out))
#   kaiming_uniform: U(-a, a) with a = sqrt(3 / fan_in)
#   kaiming_normal:  N(0, 1 / fan_in)

_INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def weight_init(shape: Sequence[int], mode: str, fan_in: int, fan_out: int) -> torch.Tensor:
    """A freshly initialised tensor of `shape` drawn according to `mode`."""
    if mode == "xavier_uniform":
        return (torch.rand(*shape) * 2 - 1) * math.sqrt(6 / (fan_in + fan_out))
    if mode == "xavier_normal":
        return torch.randn(*shape) * math.sqrt(2 / (fan_in + fan_out))
    if mode == "kaiming_uniform":
        return (torch.rand(*shape) * 2 - 1) * math.sqrt(3 / fan_in)
    if mode == "kaiming_normal":
        return torch.randn(*shape) * math.sqrt(1 / fan_in)
    raise ValueError(f"weight_init: mode must be one of {_INIT_MODES}, got {mode!r}")


# ----------------------------------------------------------------------------------------
# Layers.

class Linear(nn.Module):
    """y = x W^T + b, with W stored as `weight` [out, in] and b as `bias` [out]."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


def _resample_kernel(resample_filter: Sequence[float]) -> torch.Tensor:
    # Separable FIR filter f f^T normalised to unit DC gain: shape [1, 1, k, k].
    f = torch.as_tensor(list(resample_filter), dtype=torch.float32)
    return (torch.outer(f, f) / f.sum().square())[None, None]


class Conv2d(nn.Module):
    """Square convolution with optional 2x up- or downsampling by a FIR filter.

    `kernel=0` makes a pure resampling layer without weights. The filter is registered
    as the persistent buffer `resample_filter` only when `up` or `down` is set (EDM's
    state_dicts contain it exactly for those layers).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True,
                 up: bool = False, down: bool = False, resample_filter: Sequence[float] = (1, 1),
                 fused_resample: bool = False, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d: up and down cannot both be set")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel,
                    fan_out=out_channels * kernel * kernel)
        self.weight = (nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight)
                       if kernel else None)
        self.bias = nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        self.register_buffer("resample_filter", _resample_kernel(resample_filter) if up or down else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        # Upsampling is a depthwise transposed convolution with 4 f (the 2x2 zero-stuffing
        # divides the DC gain by 4); downsampling a depthwise strided convolution with f.
        if self.fused_resample and self.up and w is not None:
            # Upsample first, then convolve; the paddings of the two steps are merged.
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            # Convolve at full resolution (padding w_pad + f_pad), then filter with stride 2.
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                             stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x + b.reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(num_groups, C // min_channels_per_group) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is smaller than "
                             f"min_channels_per_group={min_channels_per_group}")
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        if torch.is_autocast_enabled(device):
            # CUDA autocast runs group_norm in fp32 and returns fp32 activations, so every
            # norm + SiLU would move fp32 tensors plus casts. The kernel accumulates its
            # statistics in fp32 for bf16/fp16 inputs anyway: keep the autocast dtype.
            dtype = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype),
                                    self.eps)
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


# ----------------------------------------------------------------------------------------
# Residual block: the union of the DDPM++, NCSN++ and ADM blocks.

class UNetBlock(nn.Module):
    """Pre-activation residual block conditioned on an embedding, with optional 2x
    resampling and optional multi-head self-attention after the residual branch.

        h = conv0(silu(norm0(x)))
        h = silu(norm1(h) * (1 + scale) + shift)      (adaptive_scale, ADM)
          | silu(norm1(h + affine(emb)))              (DDPM++ / NCSN++)
        x = skip_scale * (conv1(dropout(h)) + skip(x))
        x = skip_scale * (x + proj(attention(qkv(norm2(x)))))
    """

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0.0, skip_scale: float = 1.0,
                 eps: float = 1e-5, resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False,
                 adaptive_scale: bool = True, init: Mapping[str, Any] | None = None,
                 init_zero: Mapping[str, Any] | None = None, init_attn: Mapping[str, Any] | None = None):
        super().__init__()
        init = dict(init or {})
        init_zero = dict(init_zero) if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down,
                            resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection when the width changes (or when asked for); otherwise the
            # skip path only resamples.
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down,
                               resample_filter=resample_filter, **init)

        if self.num_heads:
            if out_channels % self.num_heads:
                raise ValueError(f"UNetBlock: out_channels={out_channels} is not divisible by "
                                 f"num_heads={self.num_heads}")
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1,
                              **(dict(init_attn) if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            batch, channels, height, width = x.shape
            head_dim = channels // self.num_heads
            # qkv channels are laid out as [head, head_dim, (q, k, v)] (EDM's layout).
            q, k, v = self.qkv(self.norm2(x)).reshape(batch * self.num_heads, head_dim, 3, -1).unbind(2)
            # softmax(q^T k / sqrt(head_dim)) v over the height*width positions, in fp32.
            a = F.scaled_dot_product_attention(q.transpose(1, 2).float(), k.transpose(1, 2).float(),
                                               v.transpose(1, 2).float())
            a = a.to(x.dtype).transpose(1, 2).reshape(batch, channels, height, width)
            x = (self.proj(a) + x) * self.skip_scale
        return x


# ----------------------------------------------------------------------------------------
# Noise-level embeddings.

class PositionalEmbedding(nn.Module):
    """Transformer sinusoids [cos(x w_j), sin(x w_j)] with w_j = max_positions^(-j / D),
    D = num_channels / 2 (- 1 with `endpoint`, so that the last frequency is 1 / max_positions)."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = self.num_channels // 2
        exponents = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** exponents
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2 pi x f), sin(2 pi x f)], f ~ N(0, scale^2) (buffer `freqs`)."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def _one_hot_labels(class_labels: torch.Tensor | None, label_dim: int, batch: int,
                    like: torch.Tensor) -> torch.Tensor:
    # Class labels as a float [B, label_dim] matrix: one-hot rows, integer indices, or
    # None (the all-zero "no class" vector, as EDM does).
    if class_labels is None:
        return torch.zeros(batch, label_dim, device=like.device, dtype=like.dtype)
    if not class_labels.is_floating_point():
        if class_labels.ndim != 1:
            raise ValueError(f"class_labels: integer labels must have shape [B], got {tuple(class_labels.shape)}")
        return F.one_hot(class_labels.long(), label_dim).to(like.dtype)
    if class_labels.ndim != 2 or class_labels.shape[1] != label_dim:
        raise ValueError(f"class_labels: expected shape [B, {label_dim}], got {tuple(class_labels.shape)}")
    return class_labels.to(like.dtype)


# ----------------------------------------------------------------------------------------
# DDPM++ and NCSN++ (Song et al. 2021), in EDM's re-implementation.

class SongUNet(nn.Module):
    """The DDPM++ (`embedding_type='positional'`, `encoder_type='standard'`,
    `resample_filter=(1, 1)`) and NCSN++ (`'fourier'`, `'residual'`, `(1, 3, 3, 1)`,
    `channel_mult_noise=2`) U-Nets.

    forward(x, noise_labels, class_labels) -> F, with x [B, in_channels, R, R],
    noise_labels [B] (c_noise) and class_labels [B, label_dim] or None.
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 channel_mult_emb: int = 4, num_blocks: int = 4, attn_resolutions: Sequence[int] = (16,),
                 dropout: float = 0.10, label_dropout: float = 0.0, embedding_type: str = "positional",
                 channel_mult_noise: int = 1, encoder_type: str = "standard", decoder_type: str = "standard",
                 resample_filter: Sequence[float] = (1, 1)):
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"SongUNet: embedding_type must be 'positional' or 'fourier', got {embedding_type!r}")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"SongUNet: encoder_type must be 'standard', 'skip' or 'residual', got {encoder_type!r}")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"SongUNet: decoder_type must be 'standard' or 'skip', got {decoder_type!r}")
        _check_resolution("SongUNet", img_resolution, channel_mult)

        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5),
                            eps=1e-6, resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                            init=init, init_zero=init_zero, init_attn=init_attn)

        # Mapping network: c_noise (and the class) -> embedding shared by all blocks.
        if embedding_type == "positional":
            self.map_noise = PositionalEmbedding(noise_channels, endpoint=True)
        else:
            self.map_noise = FourierEmbedding(noise_channels)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder. `aux` tracks the channel count of NCSN++'s auxiliary input pyramid.
        self.enc = nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, kernel=0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, kernel=3, down=True,
                                                                   resample_filter=resample_filter,
                                                                   fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder: attention only in the last block of a resolution; the output head
        # (aux_norm, aux_conv) sits at full resolution, or at every level for 'skip'.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, kernel=0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # [cos, sin] -> [sin, cos]
        if self.map_label is not None:
            labels = _one_hot_labels(class_labels, self.label_dim, x.shape[0], emb)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels * math.sqrt(self.label_dim))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                tmp = block(x)
            elif "aux_conv" in name:
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ----------------------------------------------------------------------------------------
# ADM (Dhariwal & Nichol 2021), in EDM's re-implementation.

class DhariwalUNet(nn.Module):
    """The ADM U-Net: adaptive group-norm scale/shift, 64 channels per attention head,
    class embedding added after the noise MLP.

    forward(x, noise_labels, class_labels) -> F (same convention as SongUNet).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_emb: int = 4, num_blocks: int = 3, attn_resolutions: Sequence[int] = (32, 16, 8),
                 dropout: float = 0.10, label_dropout: float = 0.0, channels_per_head: int = 64):
        super().__init__()
        _check_resolution("DhariwalUNet", img_resolution, channel_mult)
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=channels_per_head, dropout=dropout,
                            init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=(res in attn_resolutions),
                                                                **block_kwargs)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.map_noise(noise_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = _one_hot_labels(class_labels, self.label_dim, x.shape[0], emb)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = F.silu(emb)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def _check_resolution(name: str, img_resolution: int, channel_mult: Sequence[int]) -> None:
    levels = len(channel_mult)
    if levels < 1:
        raise ValueError(f"{name}: channel_mult must have at least one entry, got {list(channel_mult)}")
    if img_resolution < 1 or img_resolution % (1 << (levels - 1)):
        raise ValueError(f"{name}: img_resolution={img_resolution} must be divisible by "
                         f"2^(len(channel_mult) - 1) = {1 << (levels - 1)}")


# ----------------------------------------------------------------------------------------
# Named configurations (plain dicts: `model_type` + the constructor's keyword arguments).

MODEL_TYPES: dict[str, type[nn.Module]] = {"SongUNet": SongUNet, "DhariwalUNet": DhariwalUNet}

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
