"""PID against the analytic Gaussian-mixture teacher (``pid_fast.models.analytic``), whose
PF-ODE solution is known to any accuracy: an exact check of the one-step student.

``distill`` trains a small ``MLPStudent`` with ``pid_fast.loss.PIDLoss`` against the teacher and
``endpoint_error`` compares its one-step output x_theta(T z, sigma_min) with the exact
x(sigma_min); ``sweep_n`` repeats this over the grid size N (the paper's observation: the
one-step quality improves with N, then saturates). The finite difference of PID is first
order, so the grid conditions i < N - 1 pin the student to an Euler solution with N - 1
steps on PID's grid (``pid_grid_euler``): its error, O(1/N), is the floor a perfect student of
that N reaches.
"""

from __future__ import annotations

import time
from typing import Any, Optional, Sequence

import torch
from torch import nn

from pid_fast.checks import check_int
from pid_fast.eval.metrics import fd_from_features
from pid_fast.loss import PIDLoss
from pid_fast.models.analytic import GaussianMixtureDenoiser, MLPStudent, default_mixture
from pid_fast.models.guidance import GuidedDenoiser
from pid_fast.sampling import SIGMA_MAX, SIGMA_MIN, pid_grid, student_sample

__all__ = ["distill", "endpoint_error", "pid_grid_euler", "sweep_n", "mixture_of", "random_labels"]


def mixture_of(teacher: Any) -> GaussianMixtureDenoiser:
    """The Gaussian mixture a teacher is built on: the mixture itself, or the main denoiser of a
    guided one (pid_fast.guided)."""
    mixture = teacher.main if isinstance(teacher, GuidedDenoiser) else teacher
    if not isinstance(mixture, GaussianMixtureDenoiser):
        raise TypeError(f"teacher must be a GaussianMixtureDenoiser or a guided one, got {type(teacher).__name__}")
    return mixture


def random_labels(mixture: GaussianMixtureDenoiser, batch: int, generator: torch.Generator) -> Optional[torch.Tensor]:
    """Uniform one-hot class labels for a class-conditional mixture (None for an unconditional one)."""
    if not mixture.label_dim:
        return None
    classes = torch.randint(0, mixture.label_dim, (batch,), generator=generator)
    return nn.functional.one_hot(classes, mixture.label_dim).float()


def distill(teacher: Any, N: int, *, steps: int = 1500, batch_size: int = 256,
            lr: float = 3e-3, seed: int = 0, hidden: int = 128, depth: int = 3, norm: str = "l2",
            sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, backend: Optional[str] = None,
            derivative: str = "fd") -> MLPStudent:
    """PID-distil ``teacher`` (a Gaussian mixture, class-conditional or not, or a guided teacher
    built on one) into a fresh ``MLPStudent`` with grid size N (``PIDLoss``, with the
    finite difference or the jvp ``derivative``), Adam with a cosine learning-rate decay to 0 (so
    that the final weights are an optimum rather than a noisy iterate), float32, deterministic
    for a seed on the CPU. A class-conditional teacher gets uniform random class labels."""
    mixture = mixture_of(teacher)
    check_int(steps, "steps")
    check_int(batch_size, "batch_size")
    torch.manual_seed(seed)
    student = MLPStudent(mixture.dim, hidden=hidden, depth=depth, label_dim=mixture.label_dim)
    loss_fn = PIDLoss(teacher, N=N, sigma_min=sigma_min, sigma_max=sigma_max, norm=norm, backend=backend,
                      derivative=derivative)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    gen = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        z = torch.randn((batch_size, *mixture.sample_shape), generator=gen)
        labels = random_labels(mixture, batch_size, gen)
        loss = loss_fn(student, z * sigma_max, labels, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return student.eval().requires_grad_(False)


@torch.no_grad()
def endpoint_error(student: nn.Module, teacher: Any, z: torch.Tensor, *,
                   sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                   exact: Optional[torch.Tensor] = None, labels: Optional[torch.Tensor] = None) -> dict[str, float]:
    """The one-step student x_theta(T z, sigma_min) against the exact PF-ODE solution
    x(sigma_min) from x(T) = T z (of the guided ODE for a guided teacher; ``labels``: the
    condition of each sample for a class-conditional one): RMS error per coordinate ('rmse'),
    mean per-sample L2 error ('l2'), and the Frechet distance between the two point clouds
    ('fd', clean-fid's ``frechet_distance`` on the coordinates). ``exact`` skips recomputing
    the ODE solution."""
    mixture = mixture_of(teacher)
    z = mixture._check_x(z, "endpoint_error")
    x = student_sample(student, z.float(), None if labels is None else labels.float(), sigma_min=sigma_min,
                       sigma_max=sigma_max, clamp=False).double()
    if exact is None:
        exact = mixture.ode_solution(z.double() * sigma_max, sigma_max, sigma_min, class_labels=labels,
                                     denoiser=None if teacher is mixture else teacher)
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
