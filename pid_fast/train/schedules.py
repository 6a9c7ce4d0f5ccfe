"""What changes over a run besides the weights: the learning rate, and how the grid indices
of each step are drawn and weighted (config['optimizer'] and config['grid']).

- ``lr_factor``: the learning rate at a step as a multiple of optimizer.lr: a linear warm-up over
  ``warmup_steps``, then constant (the reference), EDM2's inverse square root decay
  lr / sqrt(max(step / decay_steps, 1)), or a cosine decay to 0 at decay_steps (for a fixed
  budget: the last weights are an optimum rather than a noisy iterate). The lr is a function of
  the step only (no state), so a resumed run may change the schedule, e.g. a longer horizon;
- ``grid_size_at``: the coarse-to-fine grid schedule: a coarse grid of N' points nested in the
  run's N-point grid ((N - 1) divisible by (N' - 1): every coarse time is a fine-grid time, so the
  teacher sees the same times) until a given step, then the next level, then N;
- ``GridIndexSampler``: the grid indices of a step, uniform (the reference) or drawn by
  importance (probability rising with each index's running mean loss, mixed with the uniform
  draw), and the per-sample weights that go with them: 1 / (N p_i) for importance sampling (the
  expected loss stays the reference's), times w(t) for the "adaptive" weighting (each index's
  loss divided by its running mean: every grid condition counts alike, as EDM2's learned
  per-noise-level weighting does), or times the "endpoint" weighting (fixed: each index's weight
  in the one-step sample's error, below). Its running means are device tensors (no host sync) and
  part of the checkpoint (resume is exact).

The "endpoint" weighting: the residual r = pred - D is t times the student's error in the drift
dx/dt, so a residual r_i at grid time t_i moves the ODE's end point by about r_i (t_i - t_i2) / t_i
(one grid interval of that drift error). The weight (|t_i - t_i2| / t_i)^power, normalised to mean
1 over the grid, makes an l2 loss (power 2) or a roughly linear pseudo-Huber loss (power 1) count
each index by its share of that end-point error instead of by its raw scale (the raw residual
peaks near t = 1 and is ~100x smaller at sigma_min, where the one-step sample is read out). On the
EDM grid (rho 7, 0.002 .. 80, N 250) power 1 weighs the last index ~4.8x the first. A negative
power tilts the other way (power -1: T's index ~4.8x sigma_min's), which is what measured better on
the digits teacher (benchmarks/results/convergence.md).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch

from pid_fast.loss.distillation import grid_times

__all__ = ["LR_SCHEDULES", "GRID_SAMPLINGS", "GRID_WEIGHTINGS", "lr_factor", "grid_size_at", "check_coarse_to_fine",
           "GridIndexSampler"]

LR_SCHEDULES = ("constant", "inv_sqrt", "cosine")
GRID_SAMPLINGS = ("uniform", "importance")
GRID_WEIGHTINGS = ("uniform", "adaptive", "endpoint")


def lr_factor(step: int, warmup_steps: int = 0, schedule: str = "constant", decay_steps: int = 1) -> float:
    """The learning rate of optimizer step ``step`` (0-based) divided by optimizer.lr."""
    factor = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "inv_sqrt":  # EDM2 (their eq. 5): constant until decay_steps, then 1/sqrt(t)
        factor /= math.sqrt(max(step / decay_steps, 1.0))
    elif schedule == "cosine":  # half a cosine from 1 at step 0 to 0 at decay_steps, then 0
        factor *= 0.5 * (1 + math.cos(math.pi * min(step, decay_steps) / decay_steps))
    elif schedule != "constant":
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    return factor


def check_coarse_to_fine(levels: Any, N: int, name: str = "config['grid.coarse_to_fine']") -> list[list[int]]:
    """``levels``: a list of [until_step, N'] with increasing steps and N' nested in the N grid."""
    ok = isinstance(levels, (list, tuple))
    last_step = 0
    for level in levels if ok else ():
        ok = (isinstance(level, (list, tuple)) and len(level) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) for v in level)
              and level[0] > last_step and 2 <= level[1] < N and (N - 1) % (level[1] - 1) == 0)
        if not ok:
            break
        last_step = level[0]
    if not ok:
        raise ValueError(f"{name} must be a list of [until_step, N'] pairs with increasing steps and 2 <= N' < N, "
                         f"(N - 1) divisible by (N' - 1) (nested grids; N = {N}), got {levels!r}")
    return [list(level) for level in levels]


def grid_size_at(step: int, N: int, levels: Sequence[Sequence[int]]) -> int:
    """The grid size at optimizer step ``step``: the first level whose until_step is past it, else N."""
    for until_step, coarse_n in levels:
        if step < until_step:
            return int(coarse_n)
    return int(N)


class GridIndexSampler:
    """The grid indices of a step and their per-sample loss weights, as config['grid'] says.

    sampling "uniform": i ~ UniformInt{0..n-1} (the reference; the same draw as before this
    class existed). "importance": i ~ p, p = (1 - uniform_mix) m / sum(m) + uniform_mix / n with m
    the running mean loss of each index, and weight 1 / (n p_i). weighting "adaptive": weight
    times mean(m) / m_i. Running means: per index, an exponential average (``decay`` per step) of
    the losses seen there; indices not yet seen count as the mean of those seen. The statistics
    live on the finest grid (N); a coarse level of n points reads them at its stride."""

    def __init__(self, N: int, sampling: str = "uniform", weighting: str = "uniform", *, decay: float = 0.99,
                 uniform_mix: float = 0.5, device: Any = "cpu",
                 times: Optional[Sequence[float]] = None, power: float = 1.0):
        if sampling not in GRID_SAMPLINGS:
            raise ValueError(f"sampling must be one of {GRID_SAMPLINGS}, got {sampling!r}")
        if weighting not in GRID_WEIGHTINGS:
            raise ValueError(f"weighting must be one of {GRID_WEIGHTINGS}, got {weighting!r}")
        if weighting == "endpoint" and (times is None or len(times) != 3):
            raise ValueError("weighting 'endpoint' needs times=(sigma_min, sigma_max, rho) of the grid")
        self.N, self.sampling, self.weighting = int(N), sampling, weighting
        self.decay, self.uniform_mix = float(decay), float(uniform_mix)
        self.times = None if times is None else tuple(float(v) for v in times)
        self.power = float(power)
        self._endpoint_cache: dict[int, torch.Tensor] = {}
        self.loss_sum = torch.zeros(self.N, dtype=torch.float64, device=device)
        self.count = torch.zeros(self.N, dtype=torch.float64, device=device)

    @property
    def uses_losses(self) -> bool:
        return self.sampling != "uniform" or self.weighting == "adaptive"

    def endpoint_weights(self, n: Optional[int] = None) -> torch.Tensor:
        """(|t_i - t_i2| / t_i)^power for i = 0..n-1 (i2 = i + 1, N - 2 for the last index) on
        the n-point grid, normalised to mean 1 (float64, on the CPU)."""
        n = self.N if n is None else int(n)
        if n not in self._endpoint_cache:
            i = torch.arange(n, dtype=torch.float64)
            i2 = torch.where(i == n - 1, i - 1, i + 1)
            t, t2 = (grid_times(j, n, *self.times, dtype=torch.float64) for j in (i, i2))
            w = ((t - t2).abs() / t) ** self.power
            self._endpoint_cache[n] = w / w.mean()
        return self._endpoint_cache[n]

    def _mean_losses(self, n: int) -> torch.Tensor:
        stride = (self.N - 1) // (n - 1)
        loss_sum, count = self.loss_sum[::stride], self.count[::stride]
        seen = count > 0
        means = torch.where(seen, loss_sum / count.clamp_min(1e-30), 0.0)
        overall = means.sum() / seen.sum().clamp_min(1)
        fallback = torch.where(overall > 0, overall, torch.ones_like(overall))
        return torch.where(seen, means, fallback).clamp_min(1e-12 * float(fallback))

    def draw_indices(self, generator: torch.Generator, batch: int, n: Optional[int] = None,
                     device: Any = "cpu") -> torch.Tensor:
        """Indices on the n-point grid (B,): uniform (the reference's draw), or by importance."""
        n = self.N if n is None else int(n)
        if self.sampling == "uniform":
            return torch.randint(0, n, (batch,), generator=generator, device=device)
        return torch.multinomial(self._probabilities(n).to(device), batch, replacement=True, generator=generator)

    def weights_for(self, indices: torch.Tensor, n: Optional[int] = None) -> Optional[torch.Tensor]:
        """The per-sample loss weights (B,) float32 of ``indices`` (None: all ones)."""
        if self.sampling == "uniform" and self.weighting == "uniform":
            return None
        n = self.N if n is None else int(n)
        weights = torch.ones(indices.shape, dtype=torch.float64, device=indices.device)
        if self.weighting == "endpoint":
            weights = self.endpoint_weights(n).to(indices.device)[indices]
        if not self.uses_losses:
            return weights.float()
        means = self._mean_losses(n).to(indices.device)
        if self.sampling == "importance":  # E_p[loss / (n p)] = the uniform draw's mean loss
            weights = weights / (n * self._probabilities(n).to(indices.device)[indices])
        if self.weighting == "adaptive":
            weights = weights * means.mean() / means[indices]
        return weights.float()

    def _probabilities(self, n: int) -> torch.Tensor:
        means = self._mean_losses(n)
        return (1 - self.uniform_mix) * means / means.sum() + self.uniform_mix / n

    @torch.no_grad()
    def observe(self, indices: torch.Tensor, per_sample: torch.Tensor, n: Optional[int] = None) -> None:
        """Fold one step's per-sample losses (at ``indices`` of the n-point grid) into the means."""
        if not self.uses_losses:
            return
        stride = (self.N - 1) // ((self.N if n is None else int(n)) - 1)
        fine = indices.to(self.loss_sum.device) * stride
        self.loss_sum.mul_(self.decay).index_add_(0, fine, per_sample.detach().to(self.loss_sum))
        self.count.mul_(self.decay).index_add_(0, fine, torch.ones_like(fine, dtype=self.count.dtype))

    def state_dict(self) -> dict:
        return {"loss_sum": self.loss_sum.cpu(), "count": self.count.cpu()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.loss_sum.copy_(state["loss_sum"])
        self.count.copy_(state["count"])
