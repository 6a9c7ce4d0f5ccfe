"""The layers of EDM's U-Nets (independent implementation; parameter and buffer names follow
NVlabs/edm `training/networks.py` so EDM state_dicts load with strict=True): weight
initialisation, Linear, Conv2d (with up/down-sampling), GroupNorm, UNetBlock, the noise-level
embeddings. Weights are stored in fp32 and cast to the activation dtype inside each layer.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["weight_init", "Linear", "Conv2d", "GroupNorm", "UNetBlock", "PositionalEmbedding",
           "FourierEmbedding"]

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
        if device != "meta" and torch.is_autocast_enabled(device):  # (meta: shape tracing)
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
