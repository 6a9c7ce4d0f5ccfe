"""The digits feature network (``pid-fast train-features``): a 4-conv classifier trained on the
digits; its 64-d penultimate layer is the feature space of the digits Frechet distance
(``pid_fast.eval.metrics``), as Inception's pool3 is for FID. (Formerly ``pid_fast.demo.classifier``.)"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pid_fast.checks import check_int, check_positive
from pid_fast.data.assets import CLASSIFIER_FORMAT, DEFAULT_FEATURES, RECIPE_KEY, missing_file, write_weights
from pid_fast.data.digits import DIGITS_RESOLUTION, digits_split, load_digits, random_shift
from pid_fast.io import read_checkpoint_metadata
from pid_fast.io.safetensors_io import CONFIG_METADATA_KEY as CONFIG_KEY
from pid_fast.io.safetensors_io import FORMAT_METADATA_KEY as FORMAT_KEY
from pid_fast.models.networks import count_parameters

__all__ = ["DigitsClassifier", "classifier_accuracy", "train_classifier", "load_classifier"]


class DigitsClassifier(nn.Module):
    """conv3x3(1->c) ReLU conv3x3(c->c) ReLU maxpool2 -> conv3x3(c->2c) ReLU conv3x3(2c->2c) ReLU
    maxpool2 -> flatten -> Linear(->feature_dim) [features] -> ReLU -> Linear(->10).

    ``features(x)`` returns the penultimate layer before its ReLU (a dense, roughly Gaussian
    code, better conditioned for a Frechet distance than post-ReLU activations), divided by the
    constant ``feature_scale`` that gives the real digits unit mean variance per dimension.
    Input: [B, 1, R, R] in [-1, 1], R divisible by 4."""

    def __init__(self, channels: int = 32, feature_dim: int = 64, resolution: int = DIGITS_RESOLUTION,
                 num_classes: int = 10):
        super().__init__()
        for name, v in (("channels", channels), ("feature_dim", feature_dim), ("num_classes", num_classes)):
            check_int(v, name)
        check_int(resolution, "resolution", 4)
        if resolution % 4:
            raise ValueError(f"resolution must be divisible by 4, got {resolution}")
        self.config = {"channels": channels, "feature_dim": feature_dim, "resolution": resolution,
                       "num_classes": num_classes}
        c = channels
        self.conv = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c, 2 * c, 3, padding=1), nn.ReLU(), nn.Conv2d(2 * c, 2 * c, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2))
        self.fc = nn.Linear(2 * c * (resolution // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, num_classes)
        # features() = fc(...) / feature_scale; set after training so that the real digits'
        # features have unit mean variance per dimension (FD and KID then have sane units).
        self.register_buffer("feature_scale", torch.ones(()))

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        r = self.config["resolution"]
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (1, r, r):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must have shape [B, 1, {r}, {r}] (values in [-1, 1]), got {got}")
        return x.float()

    def _logits_input(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(self._check(x)).flatten(1))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits_input(x) / self.feature_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self._logits_input(x)))


@torch.no_grad()
def classifier_accuracy(model: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor,
                        batch: int = 512) -> float:
    model.eval()
    correct = 0
    for k in range(0, images.shape[0], batch):
        correct += int((model(images[k:k + batch]).argmax(1) == labels[k:k + batch]).sum())
    return correct / images.shape[0]


def train_classifier(out: str | os.PathLike, *, epochs: int = 30, batch_size: int = 64, lr: float = 1e-3,
                     seed: int = 0, channels: int = 32, feature_dim: int = 64, augment_shift: int = 1,
                     noise_std: float = 0.1, progress: bool = True, command: Optional[str] = None) -> dict[str, Any]:
    """Train the digits classifier on a fixed 80% split (``digits_split``), report the accuracy on
    the held-out 20%, then write it to ``out``. Augmentation: random shifts of up to
    ``augment_shift`` pixels and Gaussian pixel noise of std up to ``noise_std`` (so that its
    features respond smoothly to the imperfect images of generators). CPU, deterministic."""
    check_int(epochs, "epochs")
    check_int(batch_size, "batch_size")
    check_positive(lr, "lr")
    check_int(augment_shift, "augment_shift", 0)
    check_positive(noise_std, "noise_std", allow_zero=True)
    images, labels = load_digits()
    train_idx, test_idx = digits_split(images.shape[0])
    x_train, y_train = images[train_idx], labels[train_idx]
    torch.manual_seed(seed)
    model = DigitsClassifier(channels=channels, feature_dim=feature_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    gen = torch.Generator().manual_seed(seed)

    from tqdm import tqdm

    t0 = time.perf_counter()
    for _ in tqdm(range(epochs), desc="train-features", unit="epoch", disable=not progress, dynamic_ncols=True):
        _train_epoch(model, opt, x_train, y_train, batch_size=batch_size, augment_shift=augment_shift,
                     noise_std=noise_std, gen=gen)
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        feats = torch.cat([model._logits_input(images[k:k + 512]) for k in range(0, images.shape[0], 512)])
        model.feature_scale.fill_(float(feats.var(0).mean().sqrt()))
    test_acc = classifier_accuracy(model, images[test_idx], labels[test_idx])
    train_acc = classifier_accuracy(model, x_train, y_train)
    recipe = {"kind": "digits-classifier", "command": command, "epochs": epochs, "batch_size": batch_size,
              "lr": lr, "seed": seed, "augment_shift": augment_shift, "noise_std": noise_std,
              "test_accuracy": test_acc, "train_accuracy": train_acc, "train_seconds": round(seconds, 1),
              "feature_scale": float(model.feature_scale),
              "parameters": count_parameters(model), "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    write_weights(out, model.state_dict(), {FORMAT_KEY: CLASSIFIER_FORMAT,
                                            CONFIG_KEY: json.dumps(model.config, sort_keys=True),
                                            RECIPE_KEY: json.dumps(recipe, sort_keys=True)})
    return {"path": os.fspath(out), "test_accuracy": test_acc, "train_accuracy": train_acc, "seconds": seconds,
            "parameters": count_parameters(model)}


def _train_epoch(model: DigitsClassifier, opt: torch.optim.Optimizer, images: torch.Tensor, labels: torch.Tensor,
                 *, batch_size: int, augment_shift: int, noise_std: float, gen: torch.Generator) -> None:
    """One pass over ``images`` in a random order, with shift and pixel-noise augmentation."""
    model.train()
    perm = torch.randperm(images.shape[0], generator=gen)
    for k in range(0, perm.numel(), batch_size):
        idx = perm[k:k + batch_size]
        xb = random_shift(images[idx], augment_shift, gen)
        if noise_std:
            std = torch.rand(xb.shape[0], 1, 1, 1, generator=gen) * noise_std
            xb = xb + std * torch.randn(xb.shape, generator=gen)
        loss = F.cross_entropy(model(xb), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def load_classifier(path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The frozen digits classifier (feature network) from ``path`` (default: the bundled one)."""
    from safetensors.torch import load_file

    path = os.fspath(path) if path is not None else DEFAULT_FEATURES
    if not os.path.isfile(path):
        raise missing_file(path, "feature network",
                           "pid-fast train-features --out pid_fast/assets/digits-features.safetensors")
    try:
        meta = read_checkpoint_metadata(path)
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error type on a bad header
        raise ValueError(f"feature network: {path!r} is not a readable safetensors file ({exc})") from None
    if meta.get(FORMAT_KEY) != CLASSIFIER_FORMAT:
        raise ValueError(f"feature network: {path!r} is not a digits classifier written by "
                         f"`pid-fast train-features` (format {meta.get(FORMAT_KEY)!r})")
    model = DigitsClassifier(**json.loads(meta[CONFIG_KEY]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)
