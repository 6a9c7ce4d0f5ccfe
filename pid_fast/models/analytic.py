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

``distill`` trains a small MLP student with ``pid_fast.loss.PIDLoss`` against this teacher and
``endpoint_error`` compares its one-step output x_theta(T z, sigma_min) with the exact
x(sigma_min); ``sweep_n`` repeats this over the grid size N (the paper's observation: the
one-step quality improves with N, then saturates). The finite difference of PID is first
order, so the grid conditions i < N - 1 pin the student to an Euler solution with N - 1
steps on PID's grid (``pid_grid_euler``): its error, O(1/N), is the floor a perfect student of
that N reaches.
"""

from __future__ import annotations

import math
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pid_fast.models.preconditioning import DirectDenoiser, GaussianDenoiser, _check_batch, _per_sample, sigma_vector
from pid_fast.sampling import SIGMA_MAX, SIGMA_MIN, pid_grid, student_sample

__all__ = ["GaussianMixtureDenoiser", "default_mixture", "MLPStudent", "distill", "endpoint_error",
           "pid_grid_euler", "sweep_n"]


class GaussianMixtureDenoiser(DirectDenoiser):
    """The ideal denoiser of sum_k w_k N(mu_k, s_k^2 I), built from one ``GaussianDenoiser`` per
    component (``self.components``).

    means: [K, *shape] (one sample's shape, e.g. [K, 2] or [K, 1, 4, 4]); stds: K positive
    numbers (or one for all); weights: K non-negative numbers (normalised; None = uniform).
    Computations run in the input's dtype (use float64 for references).
    """

    def __init__(self, means: Any, stds: Any = 0.1, weights: Any = None, *, label_dim: int = 0):
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

    def log_responsibilities(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """log r_k(x, sigma), shape [B, K] (log-sum-exp normalised: stable at sigma = 80)."""
        dt = x.dtype
        var = self.stds.to(dt).square()[None] + sigma.to(dt).reshape(-1, 1).square()  # [B, K]
        sq = (x.flatten(1)[:, None, :] - self.means.to(dt).flatten(1)[None]).square().sum(-1)  # [B, K]
        logp = self.weights.to(dt).log()[None] - 0.5 * sq / var - 0.5 * self.dim * var.log()
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
        r = self.log_responsibilities(x, sigma).exp()  # [B, K]
        out = torch.zeros_like(x)
        for k, comp in enumerate(self.components):
            out = out + _per_sample(r[:, k], x.ndim) * comp.denoise(x, sigma)
        return out

    @torch.no_grad()
    def ode_solution(self, x_start: torch.Tensor, sigma_start: Any, sigma_end: Any, *, tol: float = 1e-8,
                     min_steps: int = 64, max_steps: int = 1 << 16) -> torch.Tensor:
        """The PF-ODE solution x(sigma_end) from x(sigma_start) = x_start, in float64: RK4 in
        u = ln sigma with n, 2n, 4n, ... uniform steps until the error estimate of the finer
        solution, |x_2n - x_n| / 15 (fourth order), is at most ``tol`` in every entry. Raises
        RuntimeError past ``max_steps``."""
        x0 = self._check_x(x_start, "GaussianMixtureDenoiser.ode_solution").to(torch.float64)
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
            return x - self.denoise(x, u.exp())

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
        if isinstance(num, bool) or not isinstance(num, int) or num < 1:
            raise ValueError(f"num must be an int >= 1, got {num!r}")
        dev = self.means.device
        k = torch.multinomial(self.weights, num, replacement=True, generator=generator)
        eps = torch.randn((num, *self.sample_shape), generator=generator, dtype=torch.float64, device=dev)
        return (self.means[k] + _per_sample(self.stds[k], eps.ndim) * eps).to(dtype)


def default_mixture(dim: int = 2, num_components: int = 4, radius: float = 0.7, std: float = 0.1,
                    seed: int = 0) -> GaussianMixtureDenoiser:
    """K equal-weight components of std ``std`` with means on a circle of ``radius`` in the first two
    coordinates (the others centred at 0): multimodal, inside [-1, 1] like image data."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
        raise ValueError(f"dim must be an int >= 1, got {dim!r}")
    if isinstance(num_components, bool) or not isinstance(num_components, int) or num_components < 1:
        raise ValueError(f"num_components must be an int >= 1, got {num_components!r}")
    angles = torch.arange(num_components, dtype=torch.float64) * (2 * math.pi / num_components) + 0.25
    means = torch.zeros(num_components, dim, dtype=torch.float64)
    means[:, 0] = radius * angles.cos()
    if dim > 1:
        means[:, 1] = radius * angles.sin()
    return GaussianMixtureDenoiser(means, std)


# ============================================================================================
# Student, distillation and errors

class MLPStudent(nn.Module):
    """A raw student F(x_in, c_noise, labels) for vector data [B, d]: an MLP on
    [x_in, sin/cos(2^j c_noise)] with SiLU. (Image-shaped inputs are flattened and restored.)"""

    def __init__(self, dim: int, hidden: int = 128, depth: int = 3, num_freqs: int = 6):
        super().__init__()
        for name, v in (("dim", dim), ("hidden", hidden), ("depth", depth), ("num_freqs", num_freqs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.dim = dim
        self.register_buffer("freqs", 2.0 ** torch.arange(num_freqs, dtype=torch.float32))
        layers: list[nn.Module] = []
        width = dim + 2 * num_freqs
        for _ in range(depth):
            layers += [nn.Linear(width, hidden), nn.SiLU()]
            width = hidden
        layers.append(nn.Linear(width, dim))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        shape = x.shape
        h = c_noise.to(x.dtype).reshape(-1, 1) * self.freqs.to(x.dtype)
        out = self.net(torch.cat([x.reshape(shape[0], -1), h.sin(), h.cos()], dim=1))
        return out.reshape(shape)


def distill(teacher: GaussianMixtureDenoiser, N: int, *, steps: int = 1500, batch_size: int = 256,
            lr: float = 3e-3, seed: int = 0, hidden: int = 128, depth: int = 3, norm: str = "l2",
            sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, backend: Optional[str] = None) -> MLPStudent:
    """PID-distil ``teacher`` into a fresh ``MLPStudent`` with grid size N (``PIDLoss``), Adam
    with a cosine learning-rate decay to 0 (so that the final weights are an optimum rather
    than a noisy iterate), float32, deterministic for a seed on the CPU."""
    from pid_fast.loss import PIDLoss

    if not isinstance(teacher, GaussianMixtureDenoiser):
        raise TypeError(f"teacher must be a GaussianMixtureDenoiser, got {type(teacher).__name__}")
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    torch.manual_seed(seed)
    student = MLPStudent(teacher.dim, hidden=hidden, depth=depth)
    loss_fn = PIDLoss(teacher, N=N, sigma_min=sigma_min, sigma_max=sigma_max, norm=norm, backend=backend)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        z = torch.randn((batch_size, *teacher.sample_shape), generator=gen)
        loss = loss_fn(student, z * sigma_max, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval().requires_grad_(False)


@torch.no_grad()
def endpoint_error(student: nn.Module, teacher: GaussianMixtureDenoiser, z: torch.Tensor, *,
                   sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                   exact: Optional[torch.Tensor] = None) -> dict[str, float]:
    """The one-step student x_theta(T z, sigma_min) against the exact PF-ODE solution
    x(sigma_min) from x(T) = T z: RMS error per coordinate ('rmse'), mean per-sample L2 error
    ('l2'), and the Frechet distance between the two point clouds ('fd', clean-fid's
    ``frechet_distance`` on the coordinates). ``exact`` skips recomputing the ODE solution."""
    from pid_fast.eval.metrics import fd_from_features

    z = teacher._check_x(z, "endpoint_error")
    x = student_sample(student, z.float(), sigma_min=sigma_min, sigma_max=sigma_max, clamp=False).double()
    if exact is None:
        exact = teacher.ode_solution(z.double() * sigma_max, sigma_max, sigma_min)
    diff = (x - exact).flatten(1)
    return {"rmse": float(diff.square().mean().sqrt()), "l2": float(diff.norm(dim=1).mean()),
            "fd": fd_from_features(x.flatten(1), exact.flatten(1))}


@torch.no_grad()
def pid_grid_euler(teacher: GaussianMixtureDenoiser, z: torch.Tensor, N: int, *, sigma_min: float = SIGMA_MIN,
                   sigma_max: float = SIGMA_MAX, rho: float = 7.0) -> torch.Tensor:
    """Euler's method on PID's grid t_0 = T > ... > t_{N-1} = sigma_min (N - 1 steps), float64.

    PID's condition at grid index i < N - 1, y_i - t_i (y_i - y_{i+1}) / (t_i - t_{i+1}) = D(y_i; t_i),
    solved for y_{i+1} is exactly the Euler step y_{i+1} = y_i + (t_{i+1} - t_i) (y_i - D(y_i; t_i)) / t_i,
    so with y_0 = T z a student satisfying all of them returns this at sigma_min."""
    z = teacher._check_x(z, "pid_grid_euler").double()
    t = pid_grid(N, sigma_min, sigma_max, rho, dtype=torch.float64)
    x = z * sigma_max
    for i in range(N - 1):
        d = (x - teacher.denoise(x, t[i].expand(x.shape[0]))) / t[i]
        x = x + (t[i + 1] - t[i]) * d
    return x


def sweep_n(Ns: Sequence[int] = (2, 4, 8, 16, 32, 64), *, teacher: Optional[GaussianMixtureDenoiser] = None,
            num_eval: int = 2000, seed: int = 0, progress: bool = False, **distill_kwargs: Any) -> list[dict[str, Any]]:
    """For each N: distil a student (``distill``), then its endpoint error against the exact
    solution on ``num_eval`` fixed noises, and the same for Euler on PID's grid. Returns one dict
    per N with keys N, rmse, l2, fd, euler_rmse, euler_fd, seconds."""
    from pid_fast.eval.metrics import fd_from_features

    teacher = teacher or default_mixture()
    Ns = list(Ns)
    if not Ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in Ns):
        raise ValueError(f"Ns must be a non-empty list of ints >= 2, got {Ns!r}")
    sigma_min = float(distill_kwargs.get("sigma_min", SIGMA_MIN))
    sigma_max = float(distill_kwargs.get("sigma_max", SIGMA_MAX))
    z = torch.randn((num_eval, *teacher.sample_shape), generator=torch.Generator().manual_seed(10_000 + seed),
                    dtype=torch.float64)
    exact = teacher.ode_solution(z * sigma_max, sigma_max, sigma_min)
    rows = []
    for n in Ns:
        t0 = time.perf_counter()
        student = distill(teacher, n, seed=seed, **distill_kwargs)
        err = endpoint_error(student, teacher, z, sigma_min=sigma_min, sigma_max=sigma_max, exact=exact)
        euler = pid_grid_euler(teacher, z, n, sigma_min=sigma_min, sigma_max=sigma_max)
        row = {"N": n, **err, "euler_rmse": float((euler - exact).square().mean().sqrt()),
               "euler_fd": fd_from_features(euler.flatten(1), exact.flatten(1)),
               "seconds": time.perf_counter() - t0}
        rows.append(row)
        if progress:
            print(f"  N={n:4d}  student rmse {row['rmse']:.4f}  fd {row['fd']:.4f}  |  Euler on the grid "
                  f"rmse {row['euler_rmse']:.4f}  ({row['seconds']:.1f}s)", flush=True)
    return rows
