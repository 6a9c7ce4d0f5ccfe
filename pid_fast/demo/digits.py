"""The embedded default: scikit-learn's digits as 16x16 images, a small EDM teacher trained on
them, and a small digits classifier whose features feed the offline Frechet distance.

- ``load_digits`` : the 1797 8x8 digits shipped inside scikit-learn (nothing downloads),
  bilinearly upscaled to 16x16 and mapped from [0, 16] to [-1, 1], shape [1797, 1, 16, 16].
- ``train_teacher`` (``pid-fast train-teacher``): EDM's training loss (Karras et al. 2022,
  Sec. 5) on an EDM-preconditioned SongUNet (DDPM++): ln(sigma) ~ N(P_mean, P_std^2),
  loss = lambda(sigma) ||D(y + sigma eps; sigma) - y||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2,
  Adam, and EDM's EMA (half-life in images with a ramp-up). The EMA weights are written as a
  pid_fast safetensors teacher (the format of ``pid-fast convert``), loadable with
  ``edm_checkpoint.load_teacher`` and usable as ``teacher.kind = "edm"`` in ``pid-fast distill``.
- ``DigitsClassifier`` / ``train_classifier`` (``pid-fast train-features``): a 4-conv network
  trained to classify the digits; its 64-d penultimate layer is the feature space of the
  digits Frechet distance (``pid_fast.eval.metrics``), as Inception's pool3 is for FID.

Both trained networks ship in ``pid_fast/assets/`` (``DEFAULT_TEACHER``, ``DEFAULT_FEATURES``);
the exact commands that reproduce them are in their metadata (``checkpoint_recipe``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pid_fast.models.networks import build_network, count_parameters, network_config
from pid_fast.models.preconditioning import EDMPrecond

__all__ = [
    "ASSETS_DIR", "DEFAULT_TEACHER", "DEFAULT_FEATURES", "DIGITS_RESOLUTION", "DIGITS_NETWORK", "load_digits",
    "digits_split", "edm_loss", "train_teacher", "load_digits_teacher", "DigitsClassifier", "train_classifier",
    "load_classifier", "classifier_accuracy", "checkpoint_recipe",
]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_TEACHER = os.path.join(ASSETS_DIR, "digits-teacher.safetensors")
DEFAULT_FEATURES = os.path.join(ASSETS_DIR, "digits-features.safetensors")
DIGITS_RESOLUTION = 16

# The teacher's architecture: a small DDPM++ (SongUNet) at 16x16 with one channel.
DIGITS_NETWORK: dict[str, Any] = network_config(
    "tiny-ddpmpp", img_resolution=DIGITS_RESOLUTION, in_channels=1, out_channels=1, model_channels=16,
    channel_mult=(1, 2, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(), dropout=0.0)

_RECIPE_KEY = "pid_fast.recipe"  # safetensors metadata: how the file was made
_CONFIG_KEY = "pid_fast.config"  # the same keys as pid_fast.io.edm_checkpoint writes
_FORMAT_KEY = "pid_fast.format"
_CLASSIFIER_FORMAT = "pid_fast.digits_classifier/1"


def _check_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_pos(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return float(value)


# ============================================================================================
# Data

_DIGITS_CACHE: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def load_digits(resolution: int = DIGITS_RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 1, R, R] float32 in [-1, 1], labels [1797] int64) from scikit-learn's
    bundled 8x8 digits (values 0..16), bilinearly upscaled to R x R. Works offline."""
    _check_int(resolution, "resolution", 8)
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
    _check_int(num, "num", 2)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction!r}")
    perm = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, int(round(num * test_fraction)))
    return perm[n_test:].sort().values, perm[:n_test].sort().values


# ============================================================================================
# Checkpoint files

def _save(path: str, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    from safetensors.torch import save_file

    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=dict(metadata))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # an ordinary data file (safetensors may create it 0600)
    os.replace(tmp, path)


def _read_metadata(path: str) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt") as f:
        return dict(f.metadata() or {})


def checkpoint_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """How a teacher / classifier file of this module was made: the command that reproduces it,
    its options and the numbers measured at the end of training."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file: {path!r}")
    meta = _read_metadata(path)
    if _RECIPE_KEY not in meta:
        raise ValueError(f"path: {path!r} has no {_RECIPE_KEY!r} metadata (not written by pid_fast.demo.digits)")
    return json.loads(meta[_RECIPE_KEY])


def _missing(path: str, what: str, command: str) -> FileNotFoundError:
    return FileNotFoundError(f"{what}: no such file: {path!r}. Recreate it with `{command}` "
                             f"(see the README), or pass the path of your own copy.")


# ============================================================================================
# Teacher: EDM's training loss

def edm_loss(denoiser: EDMPrecond, images: torch.Tensor, *, P_mean: float = -1.2, P_std: float = 1.2,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """EDM's loss (Karras et al. 2022, Eq. 8 with Table 1's choices), mean over pixels, (B,):
    sigma = exp(P_mean + P_std u), u ~ N(0, 1); lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
    makes the effective target of F unit-variance at every sigma."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a [B, C, H, W] tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
    B = images.shape[0]
    u = torch.randn(B, generator=generator, device=images.device)
    sigma = (u * P_std + P_mean).exp()
    sd = float(getattr(denoiser, "sigma_data", 0.5))
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma.reshape(-1, 1, 1, 1)
    denoised = denoiser(images + noise, sigma)
    return weight * (denoised - images).square().flatten(1).mean(1)


def _ema_beta(batch: int, seen: int, halflife_images: float, rampup_ratio: Optional[float]) -> float:
    # EDM's EMA: half-life in images, shortened to rampup_ratio x (images seen) early on.
    half = halflife_images if rampup_ratio is None else min(halflife_images, seen * rampup_ratio)
    return 0.5 ** (batch / max(half, 1e-8))


def train_teacher(out: str | os.PathLike, *, steps: int = 4000, batch_size: int = 64, lr: float = 2e-3,
                  seed: int = 0, network: Optional[Mapping[str, Any]] = None, ema_halflife_images: float = 20000.0,
                  ema_rampup_ratio: Optional[float] = 0.1, lr_rampup_steps: int = 200, augment_shift: int = 1,
                  log_every: int = 100, progress: bool = True, device: str | torch.device = "cpu",
                  command: Optional[str] = None,
                  callback: Optional[Callable[[int, float], None]] = None) -> dict[str, Any]:
    """Train the digits teacher with EDM's loss and write its EMA weights to ``out``.

    network: network-config overrides of ``DIGITS_NETWORK`` (e.g. {"model_channels": 32}).
    augment_shift: random translation by up to this many pixels (0: none), EDM's augmentation
    reduced to what suits digits (no flips). Deterministic for a given seed and thread count on
    the CPU (`pid-fast train-teacher --threads 1` reproduces the bundled file bit for bit).
    Returns a summary (final loss = mean over the last ``log_every`` steps, time, parameters).
    """
    _check_int(steps, "steps")
    _check_int(batch_size, "batch_size")
    _check_pos(lr, "lr")
    _check_pos(ema_halflife_images, "ema_halflife_images")
    _check_int(lr_rampup_steps, "lr_rampup_steps", 0)
    _check_int(augment_shift, "augment_shift", 0)
    _check_int(log_every, "log_every")
    if network is not None and not isinstance(network, Mapping):
        raise TypeError(f"network must be a mapping of config overrides, got {type(network).__name__}")
    device = torch.device(device)
    net_cfg = dict(DIGITS_NETWORK, **dict(network or {}))
    images, _ = load_digits(int(net_cfg["img_resolution"]))
    if int(net_cfg["in_channels"]) != 1:
        raise ValueError(f"network: in_channels must be 1 for the digits, got {net_cfg['in_channels']}")
    images = images.to(device)

    torch.manual_seed(seed)
    net = build_network(net_cfg).to(device).train()
    denoiser = EDMPrecond(net, sigma_min=0.002, sigma_max=80.0, sigma_data=0.5)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator(device).manual_seed(seed)

    from tqdm import tqdm

    denormals = device.type == "cpu" and torch.set_flush_denormal(True)
    bar = tqdm(total=steps, unit="step", desc="train-teacher", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    window, window_n, last_loss, history = 0.0, 0, float("nan"), []
    try:
        for step in range(steps):
            idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen, device=device)
            batch = _random_shift(images[idx], augment_shift, gen)
            for g in opt.param_groups:
                g["lr"] = lr * min(1.0, (step + 1) / max(lr_rampup_steps, 1))
            loss = edm_loss(denoiser, batch, generator=gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p in net.parameters():  # EDM: nan_to_num on the gradients
                if p.grad is not None:
                    torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            beta = _ema_beta(batch_size, (step + 1) * batch_size, ema_halflife_images, ema_rampup_ratio)
            with torch.no_grad():
                for pe, p in zip(ema.parameters(), net.parameters()):
                    pe.lerp_(p.detach(), 1 - beta)
                for be, b in zip(ema.buffers(), net.buffers()):
                    be.copy_(b)
            window += float(loss.detach())
            window_n += 1
            bar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == steps:
                last_loss = window / window_n
                history.append({"step": step + 1, "loss": last_loss})
                bar.set_postfix(loss=f"{last_loss:.4f}")
                if callback is not None:
                    callback(step + 1, last_loss)
                window, window_n = 0.0, 0
                if not math.isfinite(last_loss):
                    raise RuntimeError(f"train-teacher: non-finite loss at step {step + 1}; lower --lr")
    finally:
        bar.close()
        if denormals:
            torch.set_flush_denormal(False)
    seconds = time.perf_counter() - t0
    config = {"precond": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "use_fp16": False,
              "network": net_cfg}
    recipe = {"kind": "digits-teacher", "command": command, "steps": steps, "batch_size": batch_size, "lr": lr,
              "seed": seed, "ema_halflife_images": ema_halflife_images, "ema_rampup_ratio": ema_rampup_ratio,
              "lr_rampup_steps": lr_rampup_steps, "augment_shift": augment_shift, "final_loss": last_loss,
              "train_seconds": round(seconds, 1), "parameters": count_parameters(net),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "loss_history": history}
    _save(out, ema.state_dict(), {_CONFIG_KEY: json.dumps(config, sort_keys=True), _FORMAT_KEY: "1",
                                  _RECIPE_KEY: json.dumps(recipe, sort_keys=True)})
    return {"path": os.fspath(out), "loss": last_loss, "seconds": seconds, "parameters": count_parameters(net),
            "history": history}


def _random_shift(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
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


def load_digits_teacher(path: Optional[str | os.PathLike] = None,
                        device: str | torch.device = "cpu") -> EDMPrecond:
    """The frozen digits teacher (an EDMPrecond) from ``path`` (default: the bundled one)."""
    from pid_fast.io.edm_checkpoint import load_teacher

    path = os.fspath(path) if path is not None else DEFAULT_TEACHER
    if not os.path.isfile(path):
        raise _missing(path, "teacher", "pid-fast train-teacher --out pid_fast/assets/digits-teacher.safetensors")
    return load_teacher(path, device=device)


# ============================================================================================
# Feature network: a small digits classifier

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
            _check_int(v, name)
        _check_int(resolution, "resolution", 4)
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
    _check_int(epochs, "epochs")
    _check_int(batch_size, "batch_size")
    _check_pos(lr, "lr")
    _check_int(augment_shift, "augment_shift", 0)
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or noise_std < 0:
        raise ValueError(f"noise_std must be a non-negative number, got {noise_std!r}")
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
        model.train()
        perm = torch.randperm(x_train.shape[0], generator=gen)
        for k in range(0, perm.numel(), batch_size):
            idx = perm[k:k + batch_size]
            xb = _random_shift(x_train[idx], augment_shift, gen)
            if noise_std:
                std = torch.rand(xb.shape[0], 1, 1, 1, generator=gen) * noise_std
                xb = xb + std * torch.randn(xb.shape, generator=gen)
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
    _save(out, model.state_dict(), {_FORMAT_KEY: _CLASSIFIER_FORMAT,
                                    _CONFIG_KEY: json.dumps(model.config, sort_keys=True),
                                    _RECIPE_KEY: json.dumps(recipe, sort_keys=True)})
    return {"path": os.fspath(out), "test_accuracy": test_acc, "train_accuracy": train_acc, "seconds": seconds,
            "parameters": count_parameters(model)}


def load_classifier(path: Optional[str | os.PathLike] = None, device: str | torch.device = "cpu") -> DigitsClassifier:
    """The frozen digits classifier (feature network) from ``path`` (default: the bundled one)."""
    from safetensors.torch import load_file

    path = os.fspath(path) if path is not None else DEFAULT_FEATURES
    if not os.path.isfile(path):
        raise _missing(path, "feature network", "pid-fast train-features --out pid_fast/assets/digits-features.safetensors")
    try:
        meta = _read_metadata(path)
        state = load_file(path)
    except Exception as exc:  # safetensors raises its own error type on a bad header
        raise ValueError(f"feature network: {path!r} is not a readable safetensors file ({exc})") from None
    if meta.get(_FORMAT_KEY) != _CLASSIFIER_FORMAT:
        raise ValueError(f"feature network: {path!r} is not a digits classifier written by "
                         f"`pid-fast train-features` (format {meta.get(_FORMAT_KEY)!r})")
    model = DigitsClassifier(**json.loads(meta[_CONFIG_KEY]))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval().requires_grad_(False)
