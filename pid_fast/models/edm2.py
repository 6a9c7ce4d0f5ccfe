"""EDM2's magnitude-preserving U-Net and its preconditioning (Karras et al. 2024, "Analyzing and
Improving the Training Dynamics of Diffusion Models", config G), written for pid_fast.

An independent implementation: only the parameter and buffer names and shapes follow NVlabs/edm2
`training/networks_edm2.py` (`UNet`, `Precond`), so that the weights of an EDM2 snapshot load
with strict=True (`pid_fast.io` reads them). The ideas, by the paper's equations:

- every layer keeps the expected magnitude (RMS) of its activations at 1: weights are
  normalised to unit norm per output channel and scaled by 1/sqrt(fan_in) (Eq. 47), SiLU is
  divided by its output RMS on unit-Gaussian input (0.596, Eq. 81), sums and concatenations
  weight their operands so the result keeps unit magnitude (Eqs. 88, 103);
- forced weight normalisation (Eq. 66): in training mode the stored weight itself is
  re-normalised before use, once after each change of its values (see MPConv.forward);
- no biases, no group norm: pixel norm of the encoder's residual stream, a learned gain on
  the embedding's modulation (`emb_gain`, starts at 0) and on the output (`out_gain`);
- the noise embedding is a Fourier feature cos(2 pi (f c_noise + phi)) * sqrt(2) with fixed
  random f, phi (buffers), c_noise = ln(sigma)/4 as in EDM; the input gets a constant
  channel of ones (the networks have no biases).

`EDM2UNet` is a raw network F(x_in, c_noise, class_labels) like pid_fast's other networks
(`in_channels` = `out_channels` = EDM2's `img_channels`), so EDMPrecond(EDM2UNet) is EDM2's
denoiser D(x; sigma) (EDM2's Precond is EDM's preconditioning with sigma_data = 0.5) and
PIDLoss, the samplers and the trainer use it unchanged. `EDM2Precond` adds EDM2's uncertainty
head (logvar_fourier, logvar_linear) and EDM2's state_dict layout (`unet.*`).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pid_fast.models.layers import _one_hot_labels
from pid_fast.models.preconditioning import EDMPrecond, sigma_vector

__all__ = ["normalize", "resample", "mp_silu", "mp_sum", "mp_cat", "MPFourier", "MPConv", "EDM2Block", "EDM2UNet",
           "EDM2Precond"]

# ----------------------------------------------------------------------------------------
# Magnitude-preserving operations.

def normalize(x: torch.Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> torch.Tensor:
    """x divided by eps + its RMS over `dim` (default: every dimension but the first), so each
    slice has unit RMS; the norm is taken in fp32."""
    if dim is None:
        dim = list(range(1, x.ndim))
    norm = torch.linalg.vector_norm(x, dim=dim, keepdim=True, dtype=torch.float32)
    rms_scale = math.sqrt(norm.numel() / x.numel())  # 1 / sqrt(elements per norm): norm -> RMS
    return x / (eps + norm * rms_scale).to(x.dtype)


def resample(x: torch.Tensor, resample_filter: Sequence[float] = (1, 1), mode: str = "keep") -> torch.Tensor:
    """2x down- or upsampling by the separable FIR filter f f^T / sum(f)^2 ('keep': x itself).
    With EDM2's f = (1, 1): 2x2 box averaging down, nearest-neighbour repetition up."""
    if mode == "keep":
        return x
    taps = torch.as_tensor(list(resample_filter), dtype=torch.float32)
    if taps.ndim != 1 or len(taps) % 2:
        raise ValueError(f"resample: the filter must have an even number of taps, got {list(resample_filter)}")
    pad = (len(taps) - 1) // 2
    kernel = torch.outer(taps, taps) / taps.sum().square()
    channels = x.shape[1]
    if mode == "down":
        kernel = kernel.to(x.device, x.dtype).expand(channels, 1, *kernel.shape)
        return F.conv2d(x, kernel, groups=channels, stride=2, padding=pad)
    if mode == "up":  # transposed convolution: each input pixel spreads over 2x2 outputs (gain 4)
        kernel = (kernel * 4).to(x.device, x.dtype).expand(channels, 1, *kernel.shape)
        return F.conv_transpose2d(x, kernel, groups=channels, stride=2, padding=pad)
    raise ValueError(f"resample: mode must be 'keep', 'down' or 'up', got {mode!r}")


def mp_silu(x: torch.Tensor) -> torch.Tensor:
    """SiLU scaled to unit output RMS on unit-Gaussian input (Eq. 81)."""
    return F.silu(x) / 0.596


def mp_sum(a: torch.Tensor, b: torch.Tensor, t: float = 0.5) -> torch.Tensor:
    """(1 - t) a + t b, rescaled so that independent unit-magnitude a, b give a unit-magnitude sum (Eq. 88)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t ** 2)


def mp_cat(a: torch.Tensor, b: torch.Tensor, dim: int = 1, t: float = 0.5) -> torch.Tensor:
    """Concatenation along `dim` in which b's share of the total magnitude is t (Eq. 103)."""
    n_a, n_b = a.shape[dim], b.shape[dim]
    total = math.sqrt((n_a + n_b) / ((1 - t) ** 2 + t ** 2))
    return torch.cat([a * (total / math.sqrt(n_a) * (1 - t)), b * (total / math.sqrt(n_b) * t)], dim=dim)


# ----------------------------------------------------------------------------------------
# Layers.

class MPFourier(nn.Module):
    """Fourier features sqrt(2) cos(freqs x + phases) of a scalar per sample (Eq. 75), computed
    in fp32; `freqs` ~ 2 pi N(0, bandwidth^2) and `phases` ~ 2 pi U(0, 1) are fixed buffers."""

    def __init__(self, num_channels: int, bandwidth: float = 1.0):
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        angle = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (angle.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving convolution (kernel (k, k)) or fully connected layer (kernel ()):
    the weight [out, in, *kernel] is used as normalize(weight) * gain / sqrt(fan_in) (Eq. 47).

    Forced weight normalisation (Eq. 66): in training mode the stored weight is replaced by
    normalize(weight) before use, as EDM2 does. It is done once per change of the weight's
    values (after each optimizer step), not at every call, so that a second forward before the
    backward (PID's unbatched finite difference) does not modify a tensor the first one saved
    for its backward; the output is the same either way (normalize is idempotent up to eps).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))
        self._normalized: tuple[int, int] | None = None  # (id, version counter) of the weight when last forced

    def forward(self, x: torch.Tensor, gain: float | torch.Tensor = 1.0) -> torch.Tensor:
        if self.training and (id(self.weight), self.weight._version) != self._normalized:
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.to(torch.float32)))
            self._normalized = (id(self.weight), self.weight._version)
        w = normalize(self.weight.to(torch.float32))
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)

    def __getstate__(self) -> dict:  # (deep)copies re-force their own weight once
        return dict(self.__dict__, _normalized=None)


class EDM2Block(nn.Module):
    """EDM2's encoder ('enc') or decoder ('dec') block (Fig. 21): optional 2x resampling, a
    residual branch modulated by the embedding, optional self-attention with pixel-normalised
    queries and keys, magnitude-preserving sums, activations clipped to +-clip_act."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256):
        super().__init__()
        if flavor not in ("enc", "dec"):
            raise ValueError(f"EDM2Block: flavor must be 'enc' or 'dec', got {flavor!r}")
        if attention and out_channels % channels_per_head:
            raise ValueError(f"EDM2Block: out_channels={out_channels} is not a multiple of "
                             f"channels_per_head={channels_per_head}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = tuple(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        # Registration order fixes the state_dict order (EDM2's).
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":  # the encoder's stream: project, then pixel norm
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1  # starts at 1: emb_gain is 0 at init
        y = mp_silu(y * scale[:, :, None, None].to(y.dtype))
        if self.training and self.dropout:
            y = F.dropout(y, p=self.dropout)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clamp(-self.clip_act, self.clip_act)
        return x

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        # qkv channels are laid out as [head, channel, (q, k, v)]; q and k are pixel-normalised
        # per head, so the logits are cosine similarities times sqrt(channels per head).
        batch, _, height, width = x.shape
        qkv = self.attn_qkv(x).reshape(batch, self.num_heads, -1, 3, height * width)
        q, k, v = normalize(qkv, dim=2).unbind(3)
        logits = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2]))
        y = torch.einsum("nhqk,nhck->nhcq", logits.softmax(dim=3), v)
        return self.attn_proj(y.reshape(*x.shape))


class EDM2UNet(nn.Module):
    """EDM2's U-Net (Fig. 21) as a raw network: forward(x, noise_labels, class_labels) -> F, with
    x [B, in_channels, R, R], noise_labels [B] (c_noise = ln(sigma)/4) and class_labels
    [B, label_dim] (one-hot), integer [B], or None (the all-zero vector).

    EDM2's `img_channels` is `in_channels` here (and `out_channels`, which must equal it: EDM2's
    networks map images to images). `label_dropout` (0 in EDM2) zeroes a sample's class vector
    with that probability in training mode. channels_per_head .. resample_filter go to every
    EDM2Block (EDM2 passes them as **block_kwargs; the names are EDM2's).
    """

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int | None = None, label_dim: int = 0,
                 model_channels: int = 192, channel_mult: Sequence[int] = (1, 2, 3, 4),
                 channel_mult_noise: int | None = None, channel_mult_emb: int | None = None, num_blocks: int = 3,
                 attn_resolutions: Sequence[int] = (16, 8), label_balance: float = 0.5,
                 concat_balance: float = 0.5, label_dropout: float = 0.0, channels_per_head: int = 64,
                 dropout: float = 0.0, res_balance: float = 0.3, attn_balance: float = 0.3,
                 clip_act: float | None = 256, resample_filter: Sequence[float] = (1, 1)):
        # One constructor on purpose: registration order fixes EDM2's state_dict order.
        super().__init__()
        block_kwargs = dict(channels_per_head=channels_per_head, dropout=dropout, res_balance=res_balance,
                            attn_balance=attn_balance, clip_act=clip_act, resample_filter=resample_filter)
        out_channels = in_channels if out_channels is None else out_channels
        if out_channels != in_channels:
            raise ValueError(f"EDM2UNet: out_channels ({out_channels}) must equal in_channels ({in_channels})")
        levels = len(channel_mult)
        if levels < 1 or img_resolution < 1 or img_resolution % (1 << (levels - 1)):
            raise ValueError(f"EDM2UNet: img_resolution={img_resolution} must be divisible by "
                             f"2^(len(channel_mult) - 1) (channel_mult={list(channel_mult)})")
        self.img_resolution = img_resolution
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.label_dropout = label_dropout
        widths = [model_channels * m for m in channel_mult]
        noise_channels = model_channels * channel_mult_noise if channel_mult_noise is not None else widths[0]
        emb_channels = model_channels * channel_mult_emb if channel_mult_emb is not None else max(widths)
        self.out_gain = nn.Parameter(torch.zeros([]))

        self.emb_fourier = MPFourier(noise_channels)
        self.emb_noise = MPConv(noise_channels, emb_channels, kernel=())
        self.emb_label = MPConv(label_dim, emb_channels, kernel=()) if label_dim else None

        # Encoder; its input has one extra constant channel of ones.
        self.enc = nn.ModuleDict()
        cout = in_channels + 1
        for level, width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, width
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = EDM2Block(cout, cout, emb_channels, flavor="enc",
                                                          resample_mode="down", **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, width
                self.enc[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, emb_channels, flavor="enc",
                                                                attention=res in attn_resolutions, **block_kwargs)

        # Decoder: every encoder output is a skip, concatenated before each 'block' of the decoder.
        self.dec = nn.ModuleDict()
        skips = [block.out_channels for block in self.enc.values()]
        for level, width in reversed(list(enumerate(widths))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec[f"{res}x{res}_in0"] = EDM2Block(cout, cout, emb_channels, flavor="dec", attention=True,
                                                         **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = EDM2Block(cout, cout, emb_channels, flavor="dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = EDM2Block(cout, cout, emb_channels, flavor="dec", resample_mode="up",
                                                        **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), width
                self.dec[f"{res}x{res}_block{idx}"] = EDM2Block(cin, cout, emb_channels, flavor="dec",
                                                                attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(cout, out_channels, kernel=(3, 3))

    def forward(self, x: torch.Tensor, noise_labels: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.emb_noise(self.emb_fourier(noise_labels.reshape(-1)))
        if self.emb_label is not None:
            labels = _one_hot_labels(class_labels, self.label_dim, x.shape[0], emb)
            if self.training and self.label_dropout:
                keep = torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = mp_sum(emb, self.emb_label(labels * math.sqrt(self.label_dim)), t=self.label_balance)
        emb = mp_silu(emb)

        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, block in self.enc.items():
            x = block(x) if name.endswith("_conv") else block(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain)


class EDM2Precond(EDMPrecond):
    """EDM2's Precond: EDM's preconditioning (sigma_data 0.5) of an EDM2UNet registered as `unet`
    (EDM2's state_dict layout: unet.*, logvar_fourier.*, logvar_linear.*), plus the uncertainty
    head u(sigma) = logvar_linear(logvar_fourier(c_noise)) of EDM2's loss (Eq. 21), returned by
    forward(..., return_logvar=True) or `logvar(sigma)`. `model` is the same module as `unet`.
    D(x; sigma) equals EDMPrecond(unet)'s; PID only needs that, so pid_fast.io converts EDM2
    snapshots to EDMPrecond + EDM2UNet and lists the logvar keys as dropped."""

    def __init__(self, unet: nn.Module, *, label_dim: int = 0, use_fp16: bool = False, sigma_data: float = 0.5,
                 logvar_channels: int = 128, **kwargs: Any):
        super().__init__(unet, label_dim=label_dim, use_fp16=use_fp16, sigma_data=sigma_data, **kwargs)
        self._modules["unet"] = self._modules.pop("model")
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())

    @property
    def model(self) -> nn.Module:
        return self._modules["unet"]

    def logvar(self, sigma: Any, batch: int | None = None) -> torch.Tensor:
        """u(sigma) as a [B, 1, 1, 1] tensor (fp32)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        sigma = sigma_vector(sigma, batch or max(sigma.numel(), 1), device=self.logvar_fourier.freqs.device)
        c_noise = self.coefficients(sigma).c_noise
        return self.logvar_linear(self.logvar_fourier(c_noise)).reshape(-1, 1, 1, 1)

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: torch.Tensor | None = None,
                force_fp32: bool = False, return_logvar: bool = False):
        denoised = super().forward(x, sigma, class_labels, force_fp32)
        if return_logvar:
            return denoised, self.logvar(sigma, x.shape[0])
        return denoised
