"""The digits data set: scikit-learn's 1797 bundled 8x8 digits (nothing downloads), as
[-1, 1] images upscaled to 16x16, a fixed train/test split, and the shift augmentation that
the teacher and the classifier both train with."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pid_fast.checks import check_int

__all__ = ["DIGITS_RESOLUTION", "load_digits", "digits_split", "random_shift"]

DIGITS_RESOLUTION = 16

_DIGITS_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def load_digits(resolution: int = DIGITS_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, R, R] float32 in [-1, 1], labels [1797] int64) from scikit-learn's
    bundled 8x8 digits (values 0..16), bilinearly upscaled to R x R. Works offline."""
    check_int(resolution, "resolution", 8)
    if resolution not in _DIGITS_CACHE:
        from sklearn.datasets import load_digits as sk_load_digits

        data = sk_load_digits()
        x = torch.as_tensor(data.images, dtype=torch.float32)[:, None] / 16.0
        if resolution != 8:
            x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
        x = (x * 2 - 1).clamp(-1, 1).contiguous()
        _DIGITS_CACHE[resolution] = (x, torch.as_tensor(data.target, dtype=torch.int64))
    x, y = _DIGITS_CACHE[resolution]
    return x.clone(), y.clone()


def digits_split(num: int = 1797, test_fraction: float = 0.2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, test indices): a fixed random split of range(num)."""
    check_int(num, "num", 2)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(num * test_fraction)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


def random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by (dy, dx) in [-shift, shift]^2 pixels, padding with the
    background value -1 (so a digit never wraps around)."""
    if shift == 0:
        return x
    B, _, H, W = x.shape
    padded = F.pad(x, (shift, shift, shift, shift), value=-1.0)
    d = torch.randint(0, 2 * shift + 1, (B, 2), generator=gen, device=x.device)
    rows = (d[:, 0, None] + torch.arange(H, device=x.device)[None])  # [B, H]
    cols = (d[:, 1, None] + torch.arange(W, device=x.device)[None])  # [B, W]
    out = padded[torch.arange(B, device=x.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2).contiguous()  # advanced indexing puts C last
