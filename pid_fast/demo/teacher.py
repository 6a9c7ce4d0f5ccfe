"""The digits teacher (``pid-fast train-teacher``): EDM's training loss (Karras et al. 2022, Sec. 5)
on an EDM-preconditioned SongUNet (DDPM++): ln(sigma) ~ N(P_mean, P_std^2),
loss = lambda(sigma) ||D(y + sigma eps; sigma) - y||^2 with lambda = (sigma^2 + sd^2) / (sigma sd)^2,
Adam, and EDM's EMA (half-life in images with a ramp-up). The EMA weights are written as a
pid_fast safetensors teacher (the format of ``pid-fast convert``), loadable with
``pid_fast.io.load_teacher`` and usable as ``teacher.kind = "edm"`` in ``pid-fast distill``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn

from pid_fast.checks import check_int, check_positive
from pid_fast.data.digits import DIGITS_RESOLUTION, load_digits, random_shift

NUM_CLASSES = 10  # the digits
from pid_fast.demo.files import DEFAULT_TEACHER, RECIPE_KEY, missing_file
from pid_fast.io import load_teacher, save_checkpoint
from pid_fast.models.networks import build_network, count_parameters, network_config
from pid_fast.models.preconditioning import EDMPrecond
from pid_fast.train.ema import update_ema

__all__ = ["DIGITS_NETWORK", "TeacherOptions", "edm_loss", "train_teacher", "load_digits_teacher"]

# The teacher's architecture: a small DDPM++ (SongUNet) at 16x16 with one channel.
DIGITS_NETWORK: dict[str, Any] = network_config(
    "tiny-ddpmpp", img_resolution=DIGITS_RESOLUTION, in_channels=1, out_channels=1, model_channels=16,
    channel_mult=(1, 2, 2), channel_mult_emb=2, num_blocks=1, attn_resolutions=(), dropout=0.0)

# EDM's preconditioning constants, the teacher file's config.
_PRECOND = {"precond": "edm", "sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "use_fp16": False}


def edm_loss(denoiser: EDMPrecond, images: torch.Tensor, *, P_mean: float = -1.2, P_std: float = 1.2,
             generator: Optional[torch.Generator] = None, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """EDM's loss (Karras et al. 2022, Eq. 8 with Table 1's choices), mean over pixels, (B,):
    sigma = exp(P_mean + P_std u), u ~ N(0, 1); lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2
    makes the effective target of F unit-variance at every sigma."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a [B, C, H, W] tensor, got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must be a [B, C, H, W] tensor, got shape {tuple(images.shape)}")
    batch = images.shape[0]
    u = torch.randn(batch, generator=generator, device=images.device)
    sigma = (u * P_std + P_mean).exp()
    sd = float(getattr(denoiser, "sigma_data", 0.5))
    weight = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    noise = torch.randn(images.shape, generator=generator, device=images.device) * sigma.reshape(-1, 1, 1, 1)
    denoised = denoiser(images + noise, sigma, labels)
    return weight * (denoised - images).square().flatten(1).mean(1)


@dataclasses.dataclass(frozen=True)
class TeacherOptions:
    """The options of ``train_teacher`` that its recipe metadata records (checked on creation)."""
    steps: int = 4000
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0
    ema_halflife_images: float = 20000.0
    ema_rampup_ratio: Optional[float] = 0.1
    lr_rampup_steps: int = 200
    augment_shift: int = 1
    # class-conditional (10 digit classes as one-hot labels), each label replaced by zeros with
    # probability label_dropout: the unconditional input that classifier-free guidance uses
    class_conditional: bool = False
    label_dropout: float = 0.0

    def __post_init__(self):
        if not 0 <= self.label_dropout < 1 or (self.label_dropout and not self.class_conditional):
            raise ValueError(f"label_dropout must be in [0, 1) and needs class_conditional, got {self.label_dropout!r}")
        check_int(self.steps, "steps")
        check_int(self.batch_size, "batch_size")
        check_positive(self.lr, "lr")
        check_positive(self.ema_halflife_images, "ema_halflife_images")
        check_int(self.lr_rampup_steps, "lr_rampup_steps", 0)
        check_int(self.augment_shift, "augment_shift", 0)

    def lr_at(self, step: int) -> float:
        """The learning rate of step ``step`` (0-based): a linear ramp-up over lr_rampup_steps."""
        return self.lr * min(1.0, (step + 1) / max(self.lr_rampup_steps, 1))

    def ema_rate(self, step: int) -> float:
        """EDM's EMA rate after step ``step`` (0-based): a half-life in images, shortened to
        ema_rampup_ratio x (images seen) early on."""
        seen = (step + 1) * self.batch_size
        half = self.ema_halflife_images
        if self.ema_rampup_ratio is not None:
            half = min(half, seen * self.ema_rampup_ratio)
        return 0.5 ** (self.batch_size / max(half, 1e-8))


def train_teacher(out: str | os.PathLike, *, steps: int = 4000, batch_size: int = 64, lr: float = 2e-3,
                  seed: int = 0, network: Optional[Mapping[str, Any]] = None, ema_halflife_images: float = 20000.0,
                  ema_rampup_ratio: Optional[float] = 0.1, lr_rampup_steps: int = 200, augment_shift: int = 1,
                  class_conditional: bool = False, label_dropout: float = 0.0, log_every: int = 100, progress: bool = True, device: str | torch.device = "cpu",
                  command: Optional[str] = None,
                  callback: Optional[Callable[[int, float], None]] = None) -> dict[str, Any]:
    """Train the digits teacher with EDM's loss and write its EMA weights to ``out``.

    network: network-config overrides of ``DIGITS_NETWORK`` (e.g. {"model_channels": 32}).
    augment_shift: random translation by up to this many pixels (0: none), EDM's augmentation
    reduced to what suits digits (no flips). class_conditional: a teacher of the 10 digit
    classes (one-hot labels; zeros = unconditional), trained with ``label_dropout`` (the share of
    labels zeroed) so that it guides itself (classifier-free guidance, pid_fast.guided). Deterministic for a given seed and thread count on
    the CPU (`pid-fast train-teacher --threads 1` reproduces the bundled file bit for bit).
    Returns a summary (final loss = mean over the last ``log_every`` steps, time, parameters).
    """
    options = TeacherOptions(steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                             ema_halflife_images=ema_halflife_images, ema_rampup_ratio=ema_rampup_ratio,
                             lr_rampup_steps=lr_rampup_steps, augment_shift=augment_shift,
                             class_conditional=class_conditional, label_dropout=label_dropout)
    check_int(log_every, "log_every")
    if network is not None and not isinstance(network, Mapping):
        raise TypeError(f"network must be a mapping of config overrides, got {type(network).__name__}")
    device = torch.device(device)
    net_cfg = dict(DIGITS_NETWORK, **({"label_dim": NUM_CLASSES} if class_conditional else {}), **dict(network or {}))
    images, classes = load_digits(int(net_cfg["img_resolution"]))
    if int(net_cfg["in_channels"]) != 1:
        raise ValueError(f"network: in_channels must be 1 for the digits, got {net_cfg['in_channels']}")

    torch.manual_seed(seed)
    net = build_network(net_cfg).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    t0 = time.perf_counter()
    history = _training_loop(net, ema, images.to(device), classes.to(device), options, device=device,
                             log_every=log_every, progress=progress, callback=callback)
    seconds = time.perf_counter() - t0
    last_loss = history[-1]["loss"]
    recipe = {"kind": "digits-teacher", "command": command, **dataclasses.asdict(options), "final_loss": last_loss,
              "train_seconds": round(seconds, 1), "parameters": count_parameters(net),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "loss_history": history}
    save_checkpoint(out, ema.state_dict(), {**_PRECOND, "network": net_cfg},
                    extra_metadata={RECIPE_KEY: json.dumps(recipe, sort_keys=True)})
    return {"path": os.fspath(out), "loss": last_loss, "seconds": seconds, "parameters": count_parameters(net),
            "history": history}


def _training_loop(net: nn.Module, ema: nn.Module, images: torch.Tensor, classes: torch.Tensor,
                   options: TeacherOptions, *,
                   device: torch.device, log_every: int, progress: bool,
                   callback: Optional[Callable[[int, float], None]]) -> list[dict[str, float]]:
    """``options.steps`` steps of EDM's loss on random shifted batches of ``images``, updating
    ``ema``; returns the loss history (the mean over each ``log_every`` steps)."""
    from tqdm import tqdm

    label_dim = NUM_CLASSES if options.class_conditional else 0
    denoiser = EDMPrecond(net, sigma_min=_PRECOND["sigma_min"], sigma_max=_PRECOND["sigma_max"],
                          sigma_data=_PRECOND["sigma_data"], label_dim=label_dim)
    opt = torch.optim.Adam(net.parameters(), lr=options.lr, betas=(0.9, 0.999), eps=1e-8)
    gen = torch.Generator(device).manual_seed(options.seed)
    denormals = device.type == "cpu" and torch.set_flush_denormal(True)
    bar = tqdm(total=options.steps, unit="step", desc="train-teacher", disable=not progress, dynamic_ncols=True)
    window: list[float] = []
    history: list[dict[str, float]] = []
    try:
        for step in range(options.steps):
            idx = torch.randint(0, images.shape[0], (options.batch_size,), generator=gen, device=device)
            batch = random_shift(images[idx], options.augment_shift, gen)
            labels = _dropped_labels(classes[idx], options.label_dropout, gen) if label_dim else None
            window.append(_optimizer_step(denoiser, opt, batch, options.lr_at(step), gen, labels))
            update_ema(ema, net, options.ema_rate(step))
            bar.update(1)
            if (step + 1) % log_every == 0 or step + 1 == options.steps:
                loss = sum(window) / len(window)
                window.clear()
                history.append({"step": step + 1, "loss": loss})
                bar.set_postfix(loss=f"{loss:.4f}")
                if callback is not None:
                    callback(step + 1, loss)
                if not math.isfinite(loss):
                    raise RuntimeError(f"train-teacher: non-finite loss at step {step + 1}; lower --lr")
    finally:
        bar.close()
        if denormals:
            torch.set_flush_denormal(False)
    return history


def _dropped_labels(classes: torch.Tensor, dropout: float, gen: torch.Generator) -> torch.Tensor:
    """One-hot labels of ``classes`` with each row zeroed with probability ``dropout``."""
    onehot = nn.functional.one_hot(classes, NUM_CLASSES).float()
    keep = torch.rand(classes.shape[0], generator=gen, device=classes.device) >= dropout
    return onehot * keep[:, None].float()


def _optimizer_step(denoiser: EDMPrecond, opt: torch.optim.Optimizer, batch: torch.Tensor, lr: float,
                    gen: torch.Generator, labels: Optional[torch.Tensor] = None) -> float:
    """One Adam step on EDM's loss of ``batch`` (with ``labels``) at learning rate ``lr``; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = edm_loss(denoiser, batch, generator=gen, labels=labels).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    for p in denoiser.model.parameters():  # EDM: nan_to_num on the gradients
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    opt.step()
    return float(loss.detach())


def load_digits_teacher(path: Optional[str | os.PathLike] = None,
                        device: str | torch.device = "cpu") -> EDMPrecond:
    """The frozen digits teacher (an EDMPrecond) from ``path`` (default: the bundled one)."""
    path = os.fspath(path) if path is not None else DEFAULT_TEACHER
    if not os.path.isfile(path):
        raise missing_file(path, "teacher", "pid-fast train-teacher --out pid_fast/assets/digits-teacher.safetensors")
    return load_teacher(path, device=device)
