"""Images: tensors in [-1, 1] to uint8, PNG grids and folders of PNGs (Pillow)."""

from __future__ import annotations

import math
import os
from typing import Optional

import numpy as np
import torch

__all__ = ["to_uint8", "image_grid", "save_image_grid", "save_images"]


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _pil(img: np.ndarray):
    from PIL import Image

    return Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)


def image_grid(x: torch.Tensor, cols: Optional[int] = None) -> np.ndarray:
    """A batch (B, C, H, W) in [-1, 1] as one uint8 (rows H, cols W, C) grid image."""
    imgs = to_uint8(x)
    B, H, W, C = imgs.shape
    cols = cols or max(1, int(math.ceil(math.sqrt(B))))
    rows = int(math.ceil(B / cols))
    grid = np.zeros((rows * H, cols * W, C), dtype=np.uint8)
    for k in range(B):
        r, c = divmod(k, cols)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = imgs[k]
    return grid


def save_image_grid(x: torch.Tensor, path: str, cols: Optional[int] = None) -> None:
    """A PNG grid of a batch (B, C, H, W) in [-1, 1]."""
    _pil(image_grid(x, cols)).save(path)


def save_images(x: torch.Tensor, folder: str, names) -> None:
    """One PNG per image, ``folder/<name>.png``."""
    os.makedirs(folder, exist_ok=True)
    for img, name in zip(to_uint8(x), names):
        _pil(img).save(os.path.join(folder, f"{name}.png"))
