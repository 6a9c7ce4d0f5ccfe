"""Guided teachers: classifier-free guidance and autoguidance as one denoiser.

With a main denoiser D_m and a guide D_g (a smaller or less-trained network of the same
family: autoguidance, Karras et al. 2024; or the main network itself without its condition:
classifier-free guidance, Ho & Salimans 2022), the guided denoiser is

    D_w(x; sigma) = D_g(x; sigma) + w (D_m(x; sigma) - D_g(x; sigma))

and the guided probability-flow ODE dx/dsigma = (x - D_w)/sigma is distilled by PID exactly
as an unguided one. With a guidance interval (Kynkaanniemi et al. 2024) w applies only for
sigma in [sigma_lo, sigma_hi], and w = 1 (the main denoiser) outside.

When both denoisers share the preconditioning (the same c_skip, c_out, c_in, c_noise), the
combination is linear in their raw outputs, D_w = c_skip x + c_out (G_g + w (G_m - G_g)), so
PIDLoss hands G_m and G_g to the fused residual op, which forms the guided target inside the
kernel (``raw_pair`` + ``guidance_scale``). Denoisers with different preconditionings are
combined as plain denoisers (c_skip = 0, c_out = 1: G = D). When main and guide are one
network, both evaluations run as one batch of 2B.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from pid_fast.models.preconditioning import (Coefficients, DirectDenoiser, FunctionDenoiser, Preconditioning,
                                             _check_batch, _per_sample, as_denoiser, declared_sigma_data,
                                             sigma_vector)

__all__ = ["GuidedDenoiser", "guided", "unconditional_labels"]

# the sigmas at which two preconditionings are compared (PID's range and beyond)
_PROBE_SIGMAS = (0.002, 0.02, 0.2, 0.5, 2.0, 20.0, 80.0)

GuideLabels = Union[None, str, torch.Tensor, Callable[[Optional[torch.Tensor]], Optional[torch.Tensor]]]


def unconditional_labels(guide_labels: GuideLabels, labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The guide's labels for the main labels ``labels``: ``guide_labels`` None keeps them;
    "zeros" gives zeros of their shape (EDM's label dropout: the unconditional input); a tensor
    (one label, e.g. a null class's one-hot or an empty prompt's embedding, with or without a
    batch dimension of 1) is repeated over the batch; a callable maps them."""
    if guide_labels is None:
        return labels
    if isinstance(guide_labels, str):
        if labels is None:
            raise ValueError("guide_labels='zeros' needs labels (the main teacher's condition) to take the shape of")
        return torch.zeros_like(labels)
    if isinstance(guide_labels, torch.Tensor):
        if labels is None:
            return guide_labels
        one = guide_labels.to(labels.device)
        if not one.is_floating_point() and one.numel() == 1 and labels.is_floating_point() and labels.dim() == 2:
            one = torch.nn.functional.one_hot(one.reshape(1).long(), labels.shape[1])  # a null class index
        one = one.to(labels.dtype)
        if one.shape == labels.shape:
            return one
        if one.shape == labels.shape[1:]:
            one = one.unsqueeze(0)
        if one.dim() == 0 or one.shape[0] != 1 or one.shape[1:] != labels.shape[1:]:
            raise ValueError(f"guide_labels: a tensor of one label's shape {tuple(labels.shape[1:])} (or with a "
                             f"leading 1, or the batch's {tuple(labels.shape)}), got {tuple(guide_labels.shape)}")
        return one.expand_as(labels)
    return guide_labels(labels)


def _check_guide_labels(guide_labels: GuideLabels) -> None:
    if guide_labels is None or callable(guide_labels) or isinstance(guide_labels, torch.Tensor):
        return
    if isinstance(guide_labels, str) and guide_labels == "zeros":
        return
    raise TypeError(f"guide_labels: None, 'zeros', a tensor (the unconditional label/embedding) or a callable "
                    f"labels -> guide labels, got {guide_labels!r}")


def _same_coefficients(a: Preconditioning, b: Preconditioning) -> bool:
    """Whether two denoisers have the same four coefficients on a probe grid of sigmas."""
    if a is b:
        return True
    if isinstance(a, DirectDenoiser) and isinstance(b, DirectDenoiser):
        return True
    if isinstance(a, DirectDenoiser) or isinstance(b, DirectDenoiser):
        return False
    sigma = torch.tensor(_PROBE_SIGMAS, dtype=torch.float64)
    try:
        ca, cb = a.coefficients(sigma), b.coefficients(sigma)
    except Exception:  # e.g. a schedule adapter that needs its own device or dtype: combine as plain denoisers
        return False
    return all(torch.allclose(x.double(), y.double(), rtol=1e-6, atol=1e-9) for x, y in zip(ca, cb))


class _PlainDenoiser(FunctionDenoiser):
    """A preconditioned denoiser seen as a plain one (G = D), for guides of another parametrisation."""

    def __init__(self, denoiser: Preconditioning):
        super().__init__(denoiser, label_dim=int(getattr(denoiser, "label_dim", 0)),
                         sigma_min=float(getattr(denoiser, "sigma_min", 0.0)),
                         sigma_max=float(getattr(denoiser, "sigma_max", float("inf"))))


class GuidedDenoiser(Preconditioning):
    """D_w = D_g + w (D_m - D_g) (see the module docstring); build it with ``guided``.

    ``forward(x, sigma, labels)`` is the guided denoiser (samplers use it); PIDLoss calls
    ``raw_pair`` (the two raw outputs in the shared preconditioning, one batch of 2B when the
    guide is the main network) and ``guidance_scale`` (w per sample) and lets the fused residual
    op combine them. ``main`` and ``guide`` are registered as submodules, so ``.to(device)``
    moves both.
    """

    def __init__(self, main: Preconditioning, guide: Preconditioning, scale: float, *,
                 guide_labels: GuideLabels = None, interval: Optional[tuple[float, float]] = None):
        if not _same_coefficients(main, guide):  # combine the denoisers themselves: G = D
            main, guide = _PlainDenoiser(main), _PlainDenoiser(guide)
        super().__init__(None, label_dim=int(getattr(main, "label_dim", 0)), use_fp16=bool(main.use_fp16))
        self.main = main
        self._guide = None if guide is main else guide  # one network: not registered twice
        self.scale = float(scale)
        self.guide_labels = guide_labels
        self.interval = None if interval is None else (float(interval[0]), float(interval[1]))
        self.sigma_min = max(float(main.sigma_min), float(self.guide.sigma_min))
        self.sigma_max = min(float(main.sigma_max), float(self.guide.sigma_max))
        sigma_data = declared_sigma_data(main)
        if sigma_data is not None:
            self.sigma_data = sigma_data

    @property
    def guide(self) -> Preconditioning:
        return self.main if self._guide is None else self._guide

    @property
    def shares_network(self) -> bool:
        """Whether the guide is the main network (classifier-free guidance): one 2B batch."""
        return self._guide is None

    @property
    def is_identity(self) -> bool:
        """w = 1 at every sigma: the main denoiser alone (the guide is never evaluated)."""
        return self.scale == 1.0

    def coefficients(self, sigma: torch.Tensor) -> Coefficients:
        return self.main.coefficients(sigma)

    @property
    def scheduler_config(self):
        """The main teacher's diffusers scheduler config, if any: the samplers then default to its
        grid (pid_fast.sampling.default_grid), as diffusers samples the guided model."""
        return getattr(self.main, "scheduler_config", None)

    def sampling_grid(self, num_steps: int, solver: str) -> dict:
        """The main teacher's scheduler grid (samplers' grid="scheduler")."""
        if not callable(getattr(self.main, "sampling_grid", None)):
            raise ValueError(f"grid='scheduler': the main teacher {type(self.main).__name__} has no scheduler grid")
        return self.main.sampling_grid(num_steps, solver)

    def pid_sigma_range(self) -> tuple[float, float]:
        lo_m, hi_m = self.main.pid_sigma_range()
        lo_g, hi_g = self.guide.pid_sigma_range()
        return max(lo_m, lo_g), min(hi_m, hi_g)

    def model_dtype(self, device: torch.device, force_fp32: bool = False) -> torch.dtype:
        return self.main.model_dtype(device, force_fp32)

    def guidance_scale(self, sigma: torch.Tensor) -> torch.Tensor:
        """w per sample (B,) float32: the scale inside the guidance interval, 1 outside."""
        w = torch.full(sigma.shape, self.scale, dtype=torch.float32, device=sigma.device)
        if self.interval is None:
            return w
        lo, hi = self.interval
        inside = (sigma >= lo) & (sigma <= hi)
        return torch.where(inside, w, torch.ones_like(w))

    def raw_pair(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
                 force_fp32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_m, G_g): the main and the guide network's raw outputs at the same input, in fp32.
        One network (classifier-free guidance): one call of batch 2B with the labels and the
        guide's labels stacked."""
        if class_labels is not None and not class_labels.is_floating_point() and self.label_dim \
                and not isinstance(self.main, DirectDenoiser):
            class_labels = self.main._labels(class_labels, x_in.shape[0], x_in.device)  # class indices -> one-hot
        guide_labels = unconditional_labels(self.guide_labels, class_labels)
        if self.shares_network:
            batch = x_in.shape[0]
            labels = None if class_labels is None else torch.cat([class_labels, guide_labels.to(class_labels.dtype)])
            out = self.main.raw(torch.cat([x_in, x_in]), torch.cat([c_noise, c_noise]), labels, force_fp32)
            return out[:batch], out[batch:]
        return (self.main.raw(x_in, c_noise, class_labels, force_fp32),
                self.guide.raw(x_in, c_noise, guide_labels, force_fp32))

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None,
            force_fp32: bool = False) -> torch.Tensor:
        """The guided raw output G_g + w (G_m - G_g) for a constant w (no interval: the raw
        output does not know sigma; ``forward`` serves the interval)."""
        if self.is_identity:
            return self.main.raw(x_in, c_noise, class_labels, force_fp32)
        if self.interval is not None:
            raise ValueError("GuidedDenoiser.raw: with a guidance interval w depends on sigma; call the denoiser "
                             "(forward(x, sigma, labels)) or raw_pair + guidance_scale")
        g_main, g_guide = self.raw_pair(x_in, c_noise, class_labels, force_fp32)
        return torch.lerp(g_guide, g_main, self.scale)  # exact at w = 0 and w = 1

    def forward(self, x: torch.Tensor, sigma: Any, class_labels: Optional[torch.Tensor] = None,
                force_fp32: bool = False, timestep: Any = None) -> torch.Tensor:
        """D_w(x; sigma). ``timestep``: the networks' time label instead of sigma's (a sampler on a
        diffusers scheduler's own grid passes the scheduler's timesteps)."""
        x = _check_batch(x, type(self).__name__)
        if not isinstance(self.main, DirectDenoiser):  # (direct denoisers keep the caller's dtype, e.g. fp64)
            x = x.to(torch.float32)
        sigma = sigma_vector(sigma, x.shape[0], device=x.device, dtype=x.dtype)
        if self.is_identity:
            return self.main(x, sigma, class_labels, force_fp32=force_fp32,
                             **({} if timestep is None else {"timestep": timestep}))
        c = self.coefficients(sigma)
        c_noise = c.c_noise if timestep is None else sigma_vector(timestep, x.shape[0], device=x.device,
                                                                  name="timestep")
        x_in = _per_sample(c.c_in, x.ndim) * x
        g_main, g_guide = self.raw_pair(x_in, c_noise, class_labels, force_fp32)
        g = torch.lerp(g_guide, g_main, _per_sample(self.guidance_scale(sigma).to(g_main.dtype), x.ndim))
        return _per_sample(c.c_skip, x.ndim) * x + _per_sample(c.c_out, x.ndim) * g

    def extra_repr(self) -> str:
        how = "classifier-free (one network)" if self.shares_network else "separate guide"
        return f"scale={self.scale}, interval={self.interval}, {how}"


def _as_teacher(obj: Any, name: str) -> Preconditioning:
    if isinstance(obj, Preconditioning):
        return obj
    if not callable(obj):
        raise TypeError(f"{name}: a denoiser D(x, sigma, labels) (a Preconditioning or a callable), "
                        f"got {type(obj).__name__}")
    return as_denoiser(obj)


def guided(main: Any, guide: Any, scale: float, *, guide_labels: GuideLabels = None,
           interval: Optional[tuple[float, float]] = None) -> GuidedDenoiser:
    """A guided teacher D_w = D_g + w (D_m - D_g), accepted by PIDLoss, pid_distillation_loss,
    the samplers and the trainer like any other teacher.

    main, guide: denoisers D(x, sigma, labels) (a Preconditioning or a plain callable). ``guide``
        may be ``main`` itself (classifier-free guidance with one network); then
        ``guide_labels`` gives the unconditional input: "zeros" (EDM's label dropout), a tensor
        (a null class's one-hot, an empty prompt's embedding) or a callable labels -> labels.
        With a separate guide (autoguidance) the guide gets the main labels unless
        ``guide_labels`` says otherwise.
    scale: w (1: the main teacher alone, bit for bit; 0: the guide).
    interval: (sigma_lo, sigma_hi): guidance only for sigma inside it, w = 1 outside.
    """
    main = _as_teacher(main, "main")
    guide = main if guide is main else _as_teacher(guide, "guide")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not torch.isfinite(torch.tensor(float(scale))):
        raise ValueError(f"scale: a finite number (the guidance weight w), got {scale!r}")
    _check_guide_labels(guide_labels)
    if guide is main and guide_labels is None:
        raise ValueError("guide_labels: classifier-free guidance with one network (guide is main) needs the "
                         "unconditional input: 'zeros' (label dropout), a null label or embedding tensor, or a callable")
    if guide is main and int(getattr(main, "label_dim", 0)) == 0 and not isinstance(guide_labels, torch.Tensor) \
            and not callable(guide_labels):
        raise ValueError("guide is main but main is unconditional (label_dim 0): classifier-free guidance needs a "
                         "conditional network")
    if interval is not None:
        if not isinstance(interval, (tuple, list)) or len(interval) != 2 or \
                not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in interval):
            raise ValueError(f"interval: (sigma_lo, sigma_hi) with two numbers, or None, got {interval!r}")
        if not 0 <= interval[0] < interval[1]:
            raise ValueError(f"interval: needs 0 <= sigma_lo < sigma_hi, got {tuple(interval)}")
    return GuidedDenoiser(main, guide, float(scale), guide_labels=guide_labels, interval=interval)
