"""Time grids and samplers: the Karras sigma grid, PID's training grid t_i with its
neighbour rule, EDM's deterministic Heun sampler and Euler for the teacher (on EDM's grid, an
explicit sigma list or a diffusers teacher's own scheduler grid), one-step
sampling and trajectory evaluation of a PID student, and per-seed noise.

Conventions (EDM): time is the noise level sigma, the probability-flow ODE is
dx/dsigma = (x - D(x; sigma)) / sigma, and sampling starts from x(sigma_max) = sigma_max z.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from pid_fast.checks import check_int, check_sigma_range
from pid_fast.models.preconditioning import edm_coefficients, sigma_vector, student_coefficients

__all__ = [
    "SIGMA_MIN", "SIGMA_MAX", "RHO", "SIGMA_DATA", "NUM_POINTS", "karras_sigmas", "pid_time", "pid_grid",
    "pid_neighbour_index", "sample_pid_times", "GRIDS", "default_grid", "heun_sample", "euler_sample", "ode_sample",
    "seeded_randn", "seeded_latents", "student_trajectory", "student_sample",
]

SIGMA_MIN = 0.002
SIGMA_MAX = 80.0
RHO = 7.0
SIGMA_DATA = 0.5
NUM_POINTS = 250


def _check_sigma_range(sigma_min: float, sigma_max: float, rho: float, who: str) -> None:
    check_sigma_range(sigma_min, sigma_max, rho, where=f"{who}: ")


def _check_count(value: Any, minimum: int, name: str, who: str) -> int:
    return check_int(value, f"{who}: {name}", minimum)


# ----------------------------------------------------------------------------------------
# Time grids.

def pid_time(i: torch.Tensor, num_points: int = NUM_POINTS, sigma_min: float = SIGMA_MIN,
             sigma_max: float = SIGMA_MAX, rho: float = RHO, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t_i = (T^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - T^(1/rho)))^rho for integer i in [0, N-1]:
    t_0 = sigma_max, t_{N-1} = sigma_min, decreasing, dense near sigma_min (EDM's grid)."""
    _check_sigma_range(sigma_min, sigma_max, rho, "pid_time")
    _check_count(num_points, 2, "num_points", "pid_time")
    i = torch.as_tensor(i)
    if i.is_floating_point() or i.is_complex() or i.dtype == torch.bool:
        raise TypeError(f"pid_time: i must be an integer tensor, got dtype {i.dtype}")
    # Range check on CPU only: on an accelerator it would be a host sync in the training step.
    if i.device.type == "cpu" and i.numel() and (int(i.min()) < 0 or int(i.max()) > num_points - 1):
        raise ValueError(f"pid_time: i must lie in [0, {num_points - 1}], got values in "
                         f"[{int(i.min())}, {int(i.max())}]")
    # Computed in fp64 and rounded once, so every dtype sees the same grid.
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t = (hi + i.to(torch.float64) / (num_points - 1) * (lo - hi)) ** rho
    return t.to(dtype)


def pid_grid(num_points: int = NUM_POINTS, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
             rho: float = RHO, dtype: torch.dtype = torch.float32,
             device: torch.device | str | None = None) -> torch.Tensor:
    """All N grid times t_0 = sigma_max > ... > t_{N-1} = sigma_min."""
    _check_count(num_points, 2, "num_points", "pid_grid")
    return pid_time(torch.arange(num_points, device=device), num_points, sigma_min, sigma_max, rho, dtype)


def pid_neighbour_index(i: torch.Tensor, num_points: int = NUM_POINTS) -> torch.Tensor:
    """The finite-difference neighbour of grid index i: i + 1, except N - 2 for the last
    index i = N - 1 (there is no t_N; the neighbour is then the larger time t_{N-2})."""
    _check_count(num_points, 2, "num_points", "pid_neighbour_index")
    i = torch.as_tensor(i)
    if i.is_floating_point() or i.is_complex() or i.dtype == torch.bool:
        raise TypeError(f"pid_neighbour_index: i must be an integer tensor, got dtype {i.dtype}")
    return torch.where(i == num_points - 1, torch.full_like(i, num_points - 2), i + 1)


def sample_pid_times(batch: int, num_points: int = NUM_POINTS, sigma_min: float = SIGMA_MIN,
                     sigma_max: float = SIGMA_MAX, rho: float = RHO, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    """Step 1 of the PID loss: i ~ UniformInt{0..N-1} per sample, its neighbour i2, and
    the times t = t_i, t2 = t_{i2}. Returns (i, i2, t, t2), each of shape (batch,)."""
    _check_count(batch, 1, "batch", "sample_pid_times")
    _check_count(num_points, 2, "num_points", "sample_pid_times")
    gen_device = generator.device if generator is not None else device
    i = torch.randint(0, num_points, (batch,), generator=generator, device=gen_device).to(device)
    i2 = pid_neighbour_index(i, num_points)
    t = pid_time(i, num_points, sigma_min, sigma_max, rho, dtype)
    t2 = pid_time(i2, num_points, sigma_min, sigma_max, rho, dtype)
    return i, i2, t, t2


def karras_sigmas(num_steps: int = 18, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO, *, append_zero: bool = True,
                  round_sigma: Callable[[torch.Tensor], torch.Tensor] | None = None,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """EDM's sampling grid: the num_steps times of `pid_time` (sigma_max down to
    sigma_min), optionally mapped through the network's `round_sigma`, then t_N = 0."""
    _check_count(num_steps, 1, "num_steps", "karras_sigmas")
    if num_steps == 1:
        _check_sigma_range(sigma_min, sigma_max, rho, "karras_sigmas")
        t = torch.tensor([float(sigma_max)], dtype=torch.float64, device=device)
    else:
        t = pid_time(torch.arange(num_steps, device=device), num_steps, sigma_min, sigma_max, rho, torch.float64)
    if round_sigma is not None:
        t = torch.as_tensor(round_sigma(t)).to(device=t.device, dtype=torch.float64)
    if append_zero:
        t = torch.cat([t, t.new_zeros(1)])
    return t.to(dtype)


# ----------------------------------------------------------------------------------------
# Teacher samplers (deterministic: EDM's S_churn = 0).

GRIDS = ("karras", "scheduler")


def ode_sample(denoiser: Callable[..., torch.Tensor], latents: torch.Tensor,
               class_labels: torch.Tensor | None = None, *, solver: str = "heun", num_steps: int | None = None,
               sigma_min: float | None = None, sigma_max: float | None = None, rho: float | None = None,
               dtype: torch.dtype = torch.float64, sigmas: Sequence[float] | torch.Tensor | None = None,
               grid: str | None = None) -> torch.Tensor:
    """Integrate the PF-ODE from x(sigma_max) = sigma_max * latents to sigma = 0.

    The grid (``num_steps`` steps, 18 by default; grid=None: `default_grid(denoiser)`, i.e.
    "scheduler" for a teacher with a diffusers scheduler, unless sigma_min / sigma_max / rho are
    given, which are Karras-grid settings):
    - grid="karras" (EDM's): `karras_sigmas` between sigma_min and sigma_max (default 0.002, 80,
      rho 7), clipped to the denoiser's `sigma_min`/`sigma_max` attributes when it has them (as EDM
      does) and mapped through its `round_sigma`; the start is sigma_max * latents.
    - grid="scheduler": a diffusers teacher's own grid (its `sampling_grid`, e.g.
      DiffusersDenoiser with its scheduler): the sigmas and UNet timesteps that diffusers'
      EulerDiscreteScheduler / HeunDiscreteScheduler loop uses after set_timesteps(num_steps)
      (timestep_spacing, steps_offset, karras sigmas, ... from the teacher's scheduler config), the
      start latents * init_noise_sigma, and Heun's clip_sample clamp of the denoised sample when the
      config sets it: the same samples as that loop from the same latents.
    - ``sigmas``: an explicit decreasing list of noise levels, first the start (latents * sigmas[0])
      and last the end point (0 for a finished sample), used as given (num_steps = len - 1).

    `solver='heun'` is EDM's Algorithm 1 (trapezoidal correction on every step except the
    last one): 2 num_steps - 1 denoiser calls, 35 for 18 steps; diffusers' HeunDiscreteScheduler
    is the same method. `solver='euler'` takes first-order steps: num_steps calls.
    The state is kept in `dtype` (fp64 by default, like EDM).
    """
    if solver not in ("heun", "euler"):
        raise ValueError(f"ode_sample: solver must be 'heun' or 'euler', got {solver!r}")
    if grid is not None and grid not in GRIDS:
        raise ValueError(f"ode_sample: grid must be one of {GRIDS}, got {grid!r}")
    if not callable(denoiser):
        raise TypeError(f"ode_sample: denoiser must be callable D(x, sigma, labels), got {type(denoiser).__name__}")
    if not isinstance(latents, torch.Tensor) or latents.ndim < 1 or latents.shape[0] == 0:
        raise ValueError("ode_sample: latents must be a tensor with a non-empty batch dimension")
    t_steps, timesteps, start_scale, clip = _sampling_grid(denoiser, solver, num_steps, sigma_min, sigma_max, rho,
                                                           sigmas, grid, latents.device)
    batch = latents.shape[0]

    def drift(x: torch.Tensor, i: int) -> torch.Tensor:
        # dx/dt = (x - D(x; t)) / t at grid point i (with the scheduler's timestep label, if any)
        t = t_steps[i]
        if timesteps is None:
            denoised = denoiser(x, t.expand(batch), class_labels)
        else:
            denoised = denoiser(x, t.expand(batch), class_labels, timestep=timesteps[i].expand(batch))
        if clip is not None:  # the scheduler's clip_sample
            denoised = denoised.clamp(-clip, clip)
        return (x - denoised.to(dtype)) / t.to(dtype)

    x_next = latents.to(dtype) * start_scale
    steps = t_steps.numel() - 1
    for i in range(steps):
        t_cur, t_next = t_steps[i], t_steps[i + 1]
        x_cur = x_next
        d_cur = drift(x_cur, i)
        x_next = x_cur + (t_next - t_cur).to(dtype) * d_cur
        if solver == "heun" and i < steps - 1:
            # Trapezoidal rule: average the slopes at both ends of the step.
            d_prime = drift(x_next, i + 1)
            x_next = x_cur + (t_next - t_cur).to(dtype) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def default_grid(denoiser: Any) -> str:
    """The samplers' grid when none is asked for: "scheduler" for a denoiser carrying a diffusers
    scheduler (it then samples as diffusers does), else EDM's "karras"."""
    has_scheduler = getattr(denoiser, "scheduler_config", None) is not None
    return "scheduler" if has_scheduler and callable(getattr(denoiser, "sampling_grid", None)) else "karras"


def _sampling_grid(denoiser, solver: str, num_steps, sigma_min, sigma_max, rho, sigmas, grid, device
                   ) -> tuple[torch.Tensor, torch.Tensor | None, float, float | None]:
    """(the grid's sigmas in float64, the time labels at them or None, the initial noise scale, the
    range the denoised sample is clamped to or None)."""
    karras_settings = [name for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho))
                       if value is not None]
    if sigmas is not None:
        if num_steps is not None or grid is not None or karras_settings:
            given = [f"num_steps={num_steps!r}"] * (num_steps is not None) + [f"grid={grid!r}"] * (grid is not None)
            raise ValueError(f"ode_sample: pass either sigmas or num_steps / grid / sigma_min / sigma_max / rho, "
                             f"not both (got sigmas and {', '.join(given + karras_settings)})")
        t_steps = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1).to(device)
        if t_steps.numel() < 2 or not bool(torch.isfinite(t_steps).all()) or bool((t_steps < 0).any()):
            raise ValueError(f"ode_sample: sigmas must hold at least 2 finite, non-negative noise levels, got "
                             f"{t_steps.tolist()}")
        if not bool((t_steps[1:] < t_steps[:-1]).all()):
            raise ValueError(f"ode_sample: sigmas must decrease strictly, got {t_steps.tolist()}")
        return t_steps, None, float(t_steps[0]), None
    num_steps = 18 if num_steps is None else _check_count(num_steps, 1, "num_steps", "ode_sample")
    if grid is None:
        grid = "karras" if karras_settings else default_grid(denoiser)
    if grid == "scheduler":
        if karras_settings:
            raise ValueError(f"ode_sample: {', '.join(karras_settings)} set the Karras grid; grid='scheduler' takes "
                             f"the scheduler's own sigmas (pass grid='karras', or leave them out)")
        make_grid = getattr(denoiser, "sampling_grid", None)
        if make_grid is None:
            raise ValueError(f"ode_sample: grid='scheduler' needs a denoiser with a diffusers scheduler "
                             f"(DiffusersDenoiser.from_scheduler, load_diffusers_teacher), got "
                             f"{type(denoiser).__name__}")
        found = make_grid(num_steps, solver)
        return (found["sigmas"].to(device=device, dtype=torch.float64), found["timesteps"].to(device),
                float(found["init_noise_sigma"]), found.get("clip_denoised"))
    sigma_min = max(SIGMA_MIN if sigma_min is None else sigma_min, float(getattr(denoiser, "sigma_min", 0.0)))
    sigma_max = min(SIGMA_MAX if sigma_max is None else sigma_max, float(getattr(denoiser, "sigma_max", math.inf)))
    rho = RHO if rho is None else rho
    t_steps = karras_sigmas(num_steps, sigma_min, sigma_max, rho, round_sigma=getattr(denoiser, "round_sigma", None),
                            dtype=torch.float64, device=device)
    return t_steps, None, float(t_steps[0]), None


def heun_sample(denoiser: Callable[..., torch.Tensor], latents: torch.Tensor,
                class_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """EDM's deterministic 2nd-order sampler (18 steps = 35 evaluations by default; `ode_sample`'s
    keywords: num_steps, sigmas, grid='scheduler', ...)."""
    return ode_sample(denoiser, latents, class_labels, solver="heun", **kwargs)


def euler_sample(denoiser: Callable[..., torch.Tensor], latents: torch.Tensor,
                 class_labels: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """First-order (Euler) PF-ODE sampler (`ode_sample`'s keywords)."""
    return ode_sample(denoiser, latents, class_labels, solver="euler", **kwargs)


# ----------------------------------------------------------------------------------------
# Per-sample seeded noise: one generator per seed, so sample k depends only on seed k and
# not on the batch it is drawn in (same convention as EDM's generate.py).

def _generators(seeds: Sequence[int], device: torch.device | str) -> list[torch.Generator]:
    if isinstance(seeds, torch.Tensor):
        seeds = seeds.tolist()
    seeds = list(seeds)
    if not seeds:
        raise ValueError("seeds: expected at least one seed")
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, int):
            raise TypeError(f"seeds: expected ints, got {type(s).__name__}")
    return [torch.Generator(device).manual_seed(int(s) % (1 << 32)) for s in seeds]


def seeded_randn(seeds: Sequence[int], shape: Sequence[int], *, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A [len(seeds), *shape] batch of N(0, 1) noise, row k drawn from a generator seeded with seeds[k]."""
    gens = _generators(seeds, device)
    return torch.stack([torch.randn(list(shape), generator=g, device=device, dtype=dtype) for g in gens])


def seeded_latents(seeds: Sequence[int], shape: Sequence[int], label_dim: int = 0, *,
                   device: torch.device | str = "cpu",
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents z [B, *shape] and, when label_dim > 0, one-hot class labels [B, label_dim]
    drawn after the latents from the same per-seed generator (as EDM's generate.py does)."""
    if isinstance(label_dim, bool) or not isinstance(label_dim, int) or label_dim < 0:
        raise ValueError(f"seeded_latents: label_dim must be a non-negative int, got {label_dim!r}")
    gens = _generators(seeds, device)
    latents = torch.stack([torch.randn(list(shape), generator=g, device=device, dtype=dtype) for g in gens])
    if not label_dim:
        return latents, None
    idx = torch.stack([torch.randint(label_dim, size=[], generator=g, device=device) for g in gens])
    return latents, torch.nn.functional.one_hot(idx, label_dim).to(dtype)


# ----------------------------------------------------------------------------------------
# PID student.

def student_trajectory(student: Callable[..., torch.Tensor], noise: torch.Tensor, t: Any,
                       class_labels: torch.Tensor | None = None, *, sigma_max: float = SIGMA_MAX,
                       sigma_data: float = SIGMA_DATA,
                       noise_labels: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """The student's ODE solution at time t:

        x_theta(n, t) = (t / T) n + (1 - t / T) F_theta(c n, c_noise(t), labels),  c = 1 / sqrt(sd^2 + T^2),

    with `noise` = n = T z the scaled start noise [B, ...], t a float or (B,) tensor, and
    `student` the raw network F(x_in, c_noise, labels). `noise_labels` maps t to the
    network's c_noise (default EDM's ln(t) / 4; pass `teacher.coefficients(t).c_noise`'s
    rule for other preconditionings). F is evaluated in n's dtype.
    """
    if not callable(student):
        raise TypeError(f"student_trajectory: student must be callable F(x_in, c_noise, labels), "
                        f"got {type(student).__name__}")
    if not isinstance(noise, torch.Tensor) or noise.ndim < 1 or noise.shape[0] == 0:
        raise ValueError("student_trajectory: noise must be a tensor with a non-empty batch dimension")
    batch = noise.shape[0]
    t = sigma_vector(t, batch, device=noise.device, dtype=torch.float32, name="t")
    coef = student_coefficients(t, sigma_max, sigma_data)
    c_noise = noise_labels(t) if noise_labels is not None else edm_coefficients(t, sigma_data).c_noise
    view = lambda v: v.to(noise.dtype).reshape(-1, *([1] * (noise.ndim - 1)))  # noqa: E731
    F_out = student(view(coef.c) * noise, c_noise.reshape(-1), class_labels)
    if F_out.shape != noise.shape:
        raise ValueError(f"student_trajectory: student output must have shape {tuple(noise.shape)}, "
                         f"got {tuple(F_out.shape)}")
    return view(coef.a) * noise + view(coef.b) * F_out.to(noise.dtype)


def student_sample(student: Callable[..., torch.Tensor], latents: torch.Tensor,
                   class_labels: torch.Tensor | None = None, *, sigma_min: float = SIGMA_MIN,
                   sigma_max: float = SIGMA_MAX, sigma_data: float = SIGMA_DATA,
                   noise_labels: Callable[[torch.Tensor], torch.Tensor] | None = None,
                   clamp: bool = True) -> torch.Tensor:
    """One-step PID sampling: x_theta(sigma_max z, sigma_min) for latents z ~ N(0, I),
    clamped to [-1, 1] (the data range) unless `clamp=False`."""
    _check_sigma_range(sigma_min, sigma_max, 1.0, "student_sample")
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"student_sample: latents must be a tensor, got {type(latents).__name__}")
    x = student_trajectory(student, latents * sigma_max, sigma_min, class_labels, sigma_max=sigma_max,
                           sigma_data=sigma_data, noise_labels=noise_labels)
    return x.clamp(-1, 1) if clamp else x
