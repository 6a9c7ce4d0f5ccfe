"""An analytic teacher for exact validation of PID: a Gaussian mixture, whose ideal denoiser is
closed-form, so that the probability-flow ODE solution is known to any accuracy.

Data p = sum_k w_k N(mu_k, s_k^2 I) in d dimensions. With x = x_0 + sigma eps, the noisy
marginal is p_sigma = sum_k w_k N(mu_k, (s_k^2 + sigma^2) I) and the ideal denoiser is

    D(x; sigma) = E[x_0 | x] = sum_k r_k(x, sigma) (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2),
    r_k = w_k N(x; mu_k, (s_k^2 + sigma^2) I) / p_sigma(x)           (responsibilities),

each term being the single-Gaussian denoiser ``GaussianDenoiser`` of component k. Tweedie's
formula D = x + sigma^2 grad log p_sigma holds exactly (tests check it by autograd).

The PF-ODE dx/dsigma = (x - D) / sigma has no closed form for K > 1; in u = ln sigma it reads
dx/du = x - D(x; e^u), a smooth non-stiff system, which ``ode_solution`` integrates with
classical RK4 in float64, doubling the step count until the error estimate is below ``tol``.

``MLPStudent`` is a small raw student network for such vector data. The experiment that
PID-distils it against this teacher and measures the one-step error against the exact
solution, over the grid size N, is ``pid_fast.demo.analytic_sweep``.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

from pid_fast.checks import check_int
from pid_fast.models.preconditioning import DirectDenoiser, GaussianDenoiser, _check_batch, _per_sample, sigma_vector

__all__ = ["GaussianMixtureDenoiser", "default_mixture", "MLPStudent"]


class GaussianMixtureDenoiser(DirectDenoiser):
    """The ideal denoiser of sum_k w_k N(mu_k, s_k^2 I), built from one ``GaussianDenoiser`` per
    component (``self.components``).

    means: [K, *shape] (one sample's shape, e.g. [K, 2] or [K, 1, 4, 4]); stds: K positive
    numbers (or one for all); weights: K non-negative numbers (normalised; None = uniform).
    Computations run in the input's dtype (use float64 for references).
    """

    def __init__(self, means: Any, stds: Any = 0.1, weights: Any = None, *, label_dim: int = 0,
                 classes: Any = None):
        if classes is not None:
            classes = torch.as_tensor(classes, dtype=torch.long).reshape(-1)
            if classes.numel() == 0 or int(classes.min()) < 0:
                raise ValueError(f"classes: one non-negative class index per component, got {classes.tolist()}")
            label_dim = max(label_dim, int(classes.max()) + 1)
        super().__init__(label_dim=label_dim)
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim < 2 or means.shape[0] < 1:
            raise ValueError(f"means: expected shape [K, *sample_shape] with K >= 1, got {tuple(means.shape)}")
        K = means.shape[0]
        stds = torch.as_tensor(stds, dtype=torch.float64).reshape(-1)
        if stds.numel() == 1:
            stds = stds.expand(K)
        if stds.numel() != K:
            raise ValueError(f"stds: expected 1 or {K} values (one per component), got {stds.numel()}")
        if not bool((stds > 0).all()) or not bool(torch.isfinite(stds).all()):
            raise ValueError(f"stds: must be positive and finite, got {stds.tolist()}")
        if weights is None:
            weights = torch.full((K,), 1.0 / K, dtype=torch.float64)
        weights = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
        if weights.numel() != K:
            raise ValueError(f"weights: expected {K} values (one per component), got {weights.numel()}")
        if not bool((weights >= 0).all()) or not float(weights.sum()) > 0 or not bool(torch.isfinite(weights).all()):
            raise ValueError(f"weights: must be non-negative, finite and not all zero, got {weights.tolist()}")
        if classes is not None and classes.numel() != K:
            raise ValueError(f"classes: expected {K} class indices (one per component), got {classes.numel()}")
        # component k belongs to class classes[k]: the class-c denoiser is the mixture of its components
        self.register_buffer("classes", classes)
        self.components = nn.ModuleList(GaussianDenoiser(means[k], float(stds[k])) for k in range(K))
        self.register_buffer("means", means.clone())
        self.register_buffer("stds", stds.clone())
        self.register_buffer("weights", weights / weights.sum())
        self.sample_shape = tuple(means.shape[1:])

    @property
    def dim(self) -> int:
        return int(np.prod(self.sample_shape))

    def _check_x(self, x: Any, who: str) -> torch.Tensor:
        x = _check_batch(x, who)
        if tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"{who}: x must have shape [B, {', '.join(map(str, self.sample_shape))}], "
                             f"got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"{who}: x must be a floating-point tensor, got dtype {x.dtype}")
        return x

    def log_weights(self, class_labels: Optional[torch.Tensor], batch: int, dtype: torch.dtype) -> torch.Tensor:
        """log w_k per sample, [B, K]: the mixture weights, restricted to the components of each
        sample's class when the mixture has classes and a label is given (one-hot rows, or class
        indices). A zero row (EDM's label dropout) or no label: the whole mixture, unconditional."""
        w = self.weights.to(dtype)[None].expand(batch, -1)
        if self.classes is None or class_labels is None:
            return w.log()
        if not class_labels.is_floating_point():
            class_labels = nn.functional.one_hot(class_labels.long().reshape(batch), self.label_dim)
        onehot = class_labels.to(dtype).reshape(batch, self.label_dim)
        member = onehot[:, self.classes]  # [B, K]: the weight of component k's class in the label
        unconditional = onehot.abs().sum(1, keepdim=True) == 0
        return torch.where(unconditional, w, w * member).log()

    def log_responsibilities(self, x: torch.Tensor, sigma: torch.Tensor,
                             class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """log r_k(x, sigma), shape [B, K] (log-sum-exp normalised: stable at sigma = 80)."""
        dt = x.dtype
        var = self.stds.to(dt).square()[None] + sigma.to(dt).reshape(-1, 1).square()  # [B, K]
        sq = (x.flatten(1)[:, None, :] - self.means.to(dt).flatten(1)[None]).square().sum(-1)  # [B, K]
        logp = self.log_weights(class_labels, x.shape[0], dt) - 0.5 * sq / var - 0.5 * self.dim * var.log()
        return logp - logp.logsumexp(1, keepdim=True)

    def log_density(self, x: torch.Tensor, sigma: Any) -> torch.Tensor:
        """log p_sigma(x), shape [B] (the noisy marginal, normalisation included)."""
        x = self._check_x(x, "GaussianMixtureDenoiser.log_density")
        s = sigma_vector(sigma, x.shape[0], device=x.device, dtype=x.dtype)
        var = self.stds.to(x.dtype).square()[None] + s.reshape(-1, 1).square()
        sq = (x.flatten(1)[:, None, :] - self.means.to(x.dtype).flatten(1)[None]).square().sum(-1)
        logp = (self.weights.to(x.dtype).log()[None] - 0.5 * sq / var
                - 0.5 * self.dim * (2 * math.pi * var).log())
        return logp.logsumexp(1)

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self._check_x(x, type(self).__name__)
        r = self.log_responsibilities(x, sigma, class_labels).exp()  # [B, K]
        out = torch.zeros_like(x)
        for k, comp in enumerate(self.components):
            out = out + _per_sample(r[:, k], x.ndim) * comp.denoise(x, sigma)
        return out

    @torch.no_grad()
    def ode_solution(self, x_start: torch.Tensor, sigma_start: Any, sigma_end: Any, *, tol: float = 1e-8,
                     min_steps: int = 64, max_steps: int = 1 << 16, class_labels: Optional[torch.Tensor] = None,
                     denoiser: Optional[Any] = None) -> torch.Tensor:
        """The PF-ODE solution x(sigma_end) from x(sigma_start) = x_start, in float64: RK4 in
        u = ln sigma with n, 2n, 4n, ... uniform steps until the error estimate of the finer
        solution, |x_2n - x_n| / 15 (fourth order), is at most ``tol`` in every entry. Raises
        RuntimeError past ``max_steps``. class_labels: the condition (a class-conditional
        mixture). denoiser: another denoiser D(x, sigma, labels) built on this mixture, e.g. a
        guided one (pid_fast.guided), whose ODE is solved instead."""
        x0 = self._check_x(x_start, "GaussianMixtureDenoiser.ode_solution").to(torch.float64)
        denoise = self.denoise if denoiser is None else denoiser
        B = x0.shape[0]
        s0 = sigma_vector(sigma_start, B, device=x0.device, dtype=torch.float64, name="sigma_start")
        s1 = sigma_vector(sigma_end, B, device=x0.device, dtype=torch.float64, name="sigma_end")
        if not bool((s0 > 0).all() and (s1 > 0).all()):
            raise ValueError("sigma_start, sigma_end: must be positive (the ODE in ln sigma)")
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol!r}")
        u0, u1 = s0.log(), s1.log()

        def f(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
            # dx/du = sigma dx/dsigma = x - D(x; sigma), sigma = e^u
            return x - denoise(x, u.exp(), class_labels)

        def rk4(n: int) -> torch.Tensor:
            x, h = x0, (u1 - u0) / n
            hv = _per_sample(h, x.ndim)
            for j in range(n):
                u = u0 + j * h
                k1 = f(x, u)
                k2 = f(x + 0.5 * hv * k1, u + 0.5 * h)
                k3 = f(x + 0.5 * hv * k2, u + 0.5 * h)
                k4 = f(x + hv * k3, u + h)
                x = x + hv / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            return x

        n = max(1, int(min_steps))
        prev = rk4(n)
        while True:
            n *= 2
            if n > max_steps:
                raise RuntimeError(f"ode_solution: no convergence to tol={tol} within {max_steps} RK4 steps")
            cur = rk4(n)
            # RK4's error falls 16x per halving, so the error of `cur` is ~ |cur - prev| / 15.
            if float((cur - prev).abs().max()) <= 15 * tol:
                return cur
            prev = cur

    def sample(self, num: int, generator: Optional[torch.Generator] = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Exact data samples [num, *shape]."""
        check_int(num, "num")
        dev = self.means.device
        k = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        eps = torch.randn((num, *self.sample_shape), generator=generator, dtype=torch.float64, device=dev)
        return (self.means[k] + _per_sample(self.stds[k], eps.ndim) * eps).to(dtype)


def default_mixture(dim: int = 2, num_components: int = 4, radius: float = 0.7, std: float = 0.1,
                    seed: int = 0) -> GaussianMixtureDenoiser:
    """K equal-weight components of std ``std`` with means on a circle of ``radius`` in the first two
    coordinates (the others centred at 0): multimodal, inside [-1, 1] like image data."""
    check_int(dim, "dim")
    check_int(num_components, "num_components")
    angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components) + 0.25
    means = torch.zeros(num_components, dim, dtype=torch.float64)
    means[:, 0] = radius * angles.cos()
    if dim > 1:
        means[:, 1] = radius * angles.sin()
    return GaussianMixtureDenoiser(means, std)


# ============================================================================================
# Student

class MLPStudent(nn.Module):
    """A raw student F(x_in, c_noise, labels) for vector data [B, d]: an MLP on
    [x_in, sin/cos(2^j c_noise)] with SiLU. (Image-shaped inputs are flattened and restored.)"""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_freqs: int = 6, label_dim: int = 0):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth), ("num_freqs", num_freqs)):
            check_int(v, name)
        check_int(label_dim, "label_dim", 0)
        self.dim, self.label_dim = dim, label_dim
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = dim + 2 * num_freqs + label_dim  # class-conditional: the one-hot label is an input too
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        shape = x.shape
        h = c_noise.to(x.dtype).reshape(-1, 1) * self.freqs.to(x.dtype)
        parts = [x.reshape(shape[0], -1), h.sin(), h.cos()]
        if self.label_dim:
            if class_labels is None:
                raise ValueError(f"class_labels: this student is conditional (label_dim {self.label_dim}); got None")
            if not class_labels.is_floating_point():
                class_labels = nn.functional.one_hot(class_labels.long(), self.label_dim)
            parts.append(class_labels.to(x.dtype).reshape(shape[0], self.label_dim))
        out = self.net(torch.cat(parts, dim=1))
        return out.reshape(shape)
