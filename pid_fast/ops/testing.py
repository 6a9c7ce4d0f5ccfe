"""Random but realistic inputs for the PID ops, shared by the tests and the benchmarks.

Times come from the real PID grid (EDM's rho = 7 grid with N points, neighbour rule
included), the coefficients from EDM's preconditioning, the noise is n = sigma_max z.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pid_fast.models.preconditioning import edm_coefficients
from pid_fast.sampling import pid_neighbour_index, pid_time


@dataclass
class PIDCase:
    noise: torch.Tensor
    f_t: torch.Tensor
    f_t2: torch.Tensor
    teacher_out: torch.Tensor
    t: torch.Tensor
    t2: torch.Tensor
    c_skip: torch.Tensor
    c_out: torch.Tensor
    weight: torch.Tensor
    sigma_max: float = 80.0

    def streams(self):
        return self.noise, self.f_t, self.f_t2, self.teacher_out

    def coefs(self):
        return self.t, self.t2, self.c_skip, self.c_out


def make_case(shape, dtype=torch.float32, device="cpu", *, num_points=250, sigma_max=80.0,
              index=None, layout="contiguous", seed=0) -> PIDCase:
    """A PID loss input of ``shape`` = (B, ...).

    index: grid indices (B,) or an int for every sample (None: uniform random; N-1 gives the
    last-index case where t2 > t). layout: "contiguous", "strided" (every tensor a
    non-contiguous slice), "channels_last" (4-d only) or "mixed" (some tensors transposed).
    """
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    if index is None:
        i = torch.randint(0, num_points, (B,), generator=g)
    else:
        i = torch.as_tensor(index).expand(B).clone()
    t = pid_time(i, num_points, sigma_max=sigma_max)
    t2 = pid_time(pid_neighbour_index(i, num_points), num_points, sigma_max=sigma_max)
    coef = edm_coefficients(t)

    def rand(scale=1.0, k=0):
        full = list(shape)
        if layout == "strided" or (layout == "mixed" and k % 2):
            full[-1] = full[-1] * 2
        x = (torch.randn(full, generator=g) * scale).to(device=device, dtype=dtype)
        if layout == "strided" or (layout == "mixed" and k % 2):
            x = x[..., ::2]  # sliced on the device: .to(device) would make it contiguous
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    return PIDCase(
        noise=rand(sigma_max, 0), f_t=rand(1.0, 1), f_t2=rand(1.0, 2), teacher_out=rand(1.0, 3),
        t=t.to(device), t2=t2.to(device), c_skip=coef.c_skip.to(device), c_out=coef.c_out.to(device),
        weight=(torch.rand(B, generator=g) + 0.5).to(device), sigma_max=sigma_max)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64 (NaN anywhere gives inf)."""
    a, b = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))
