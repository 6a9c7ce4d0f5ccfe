"""The PID distillation loss as a drop-in ``nn.Module`` (``PIDLoss``) and a function
(``pid_distillation_loss``).

One call, for a batch of B noises n = T z (T = sigma_max), follows the spec step by step:

1. i ~ UniformInt{0..N-1} per sample, i2 = i + 1 (N - 2 at i = N - 1), t = t_i, t2 = t_i2;
2. the student's raw network F at (c n, c_noise(t)) and (c n, c_noise(t2)), c = 1/sqrt(sd^2 + T^2),
   as ONE forward of batch 2B (``batched=False``: two forwards); or, with ``derivative="jvp"``,
   one forward at t whose forward-mode derivative in c_noise gives F(t2) to first order
   (derivative.py);
3. the teacher's input c_in(t) y with y = (t/T) n + (1 - t/T) F(t), by the fused assemble op,
   in the teacher's dtype, detached;
4. G = F_teacher(c_in y, c_noise(t), labels) without gradient: in the teacher's own dtype with
   autocast off (``teacher_precision=None``), forced to fp32 ("fp32"), or under bf16 autocast
   ("bf16": matrix products and convolutions in bf16, the rest as autocast and the network decide);
5. the fused residual + norm (pid_fast.pid_loss), or pred/target (pid_fast.pid_residual) and
   LPIPS; per-sample losses (B,) float32, optionally weighted by w(t).

The student is taken as the user's trainer holds it (student.py): the raw network F, or a
preconditioned network (pid_fast's or NVlabs/edm's EDMPrecond, ...) called at sigma = t with F
recovered from its output, bare or inside DDP / FSDP / torch.compile / accelerate, always called
through the wrapper so that gradient synchronisation happens.

No host syncs: the grid indices are drawn on the noise's device and the times
are computed from them elementwise.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch
from torch import nn

from pid_fast.checks import LOSS_NORMS, check_choice, check_grid, check_norm
from pid_fast.loss.derivative import DERIVATIVES, check_derivative, student_outputs
from pid_fast.loss.student import (STUDENT_PARAMETRIZATIONS, check_deterministic, check_first_output,
                                   resolve_student)
from pid_fast.ops import pid_assemble, pid_loss, pid_residual
from pid_fast.models.preconditioning import (DirectDenoiser, Preconditioning, as_denoiser, declared_sigma_data,
                                             edm_coefficients)
from pid_fast.models.guidance import GuidedDenoiser
from pid_fast.sampling import pid_neighbour_index

__all__ = ["PIDLoss", "pid_distillation_loss", "grid_times", "default_noise_labels", "TeacherNoiseLabels", "NORMS",
           "TEACHER_PRECISIONS", "DERIVATIVES", "STUDENT_PARAMETRIZATIONS"]

NORMS = LOSS_NORMS
TEACHER_PRECISIONS = (None, "fp32", "bf16")


def grid_times(i: torch.Tensor, num_points: int, sigma_min: float, sigma_max: float,
               rho: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """t_i = (T^(1/rho) + i/(N-1) (sigma_min^(1/rho) - T^(1/rho)))^rho in ``dtype``.

    The same values as ``sampling.pid_time`` (fp64, rounded once), without its range check,
    which would sync with the device on every call."""
    hi, lo = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return ((hi + i.to(torch.float64) / (num_points - 1) * (lo - hi)) ** rho).to(dtype)


def _check_grid(num_points, sigma_min, sigma_max, rho) -> None:
    check_grid(num_points, sigma_min, sigma_max, rho)


def _check_norm(norm, huber_c, lpips) -> None:
    check_norm(norm, huber_c, norms=NORMS, lpips=lpips)


def _edm_noise_labels(t: torch.Tensor) -> torch.Tensor:
    return edm_coefficients(t).c_noise


class TeacherNoiseLabels:
    """t -> the teacher's c_noise(t). A class, not a closure, so that a PIDLoss pickles (EDM's
    training loop pickles its loss into every snapshot)."""

    def __init__(self, teacher: Preconditioning):
        self.teacher = teacher

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        return self.teacher.coefficients(t).c_noise


def default_noise_labels(teacher: Preconditioning) -> Callable[[torch.Tensor], torch.Tensor]:
    """The student's c_noise(t): the teacher's rule when the teacher is a preconditioned
    network (the student starts as a copy of it), EDM's ln(t)/4 for a direct denoiser."""
    if isinstance(teacher, GuidedDenoiser):
        teacher = teacher.main  # the student copies the main network
    if isinstance(teacher, DirectDenoiser):
        return _edm_noise_labels
    return TeacherNoiseLabels(teacher)


def resolve_sigma_data(sigma_data: Optional[float], teacher: Any) -> float:
    """The loss's sigma_data: the given value, else the one the teacher declares, else 0.5. A
    given value that differs from the teacher's declared one is an error."""
    declared = declared_sigma_data(teacher)
    if sigma_data is None:
        return declared if declared is not None else 0.5
    if isinstance(sigma_data, bool) or not isinstance(sigma_data, (int, float)) or not sigma_data > 0:
        raise ValueError(f"sigma_data must be a positive number, got {sigma_data!r}")
    if declared is not None and abs(declared - sigma_data) > 1e-9 * max(1.0, abs(sigma_data)):
        raise ValueError(f"sigma_data={sigma_data} but the teacher {type(teacher).__name__} has sigma_data={declared}: "
                         f"the student's parametrisation and the one-step sampler must use the teacher's data scale; "
                         f"leave sigma_data unset (the teacher's is used) or make the two agree")
    return float(sigma_data)


def _check_teacher_precision(teacher_precision) -> None:
    check_choice(teacher_precision, "teacher_precision", TEACHER_PRECISIONS)


def _teacher_dtype(teacher: Preconditioning, noise: torch.Tensor, force_fp32: bool) -> torch.dtype:
    if isinstance(teacher, GuidedDenoiser):
        teacher = teacher.main  # (a guide of another parametrisation is combined as a plain denoiser)
    if isinstance(teacher, DirectDenoiser):
        return noise.dtype  # direct denoisers compute in their input's dtype
    return teacher.model_dtype(noise.device, force_fp32)


def _teacher_input(noise, f_t, a, c_in, dtype, backend):
    """c_in (a n + (1 - a) F(t)), detached, in the teacher's dtype: the fused assemble op, or
    plain PyTorch for a float64 teacher (the fused ops store 16/32-bit floats)."""
    if dtype in (torch.float32, torch.float16, torch.bfloat16):
        return pid_assemble(noise, f_t, a, 1.0 - a, c_in.to(a.dtype), out_dtype=dtype, backend=backend)[1]
    view = (-1,) + (1,) * (noise.dim() - 1)
    x = a.reshape(view).to(dtype) * noise.to(dtype) + (1.0 - a).reshape(view).to(dtype) * f_t.to(dtype)
    return c_in.reshape(view).to(dtype) * x


def _check_inputs(noise, labels, indices) -> None:
    if not isinstance(noise, torch.Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got dtype {noise.dtype}")
    if noise.dim() < 2 or noise.shape[0] == 0:
        raise ValueError(f"noise must have shape (B, ...) with B >= 1, got {tuple(noise.shape)}")
    B = noise.shape[0]
    if labels is not None:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor or None, got {type(labels).__name__}")
        if labels.shape[0] != B:
            raise ValueError(f"labels must have batch size {B} (noise's), got shape {tuple(labels.shape)}")
    if indices is not None:
        if not isinstance(indices, torch.Tensor) or indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError("indices must be an integer tensor of grid indices (B,)")
        if indices.shape != (B,):
            raise ValueError(f"indices must have shape ({B},), got {tuple(indices.shape)}")


def pid_distillation_loss(student: Callable[..., torch.Tensor], teacher: Any, noise: torch.Tensor,
                          labels: Optional[torch.Tensor] = None, *, num_points: int = 250,
                          sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                          sigma_data: Optional[float] = None, norm: str = "l2",
                          huber_c: Optional[float] = None, lpips: Optional[Callable] = None,
                          weighting: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          backend: Optional[str] = None, batched: bool = True,
                          noise_labels: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                          indices: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None,
                          teacher_precision: Optional[str] = None,
                          derivative: str = "fd", return_times: bool = False,
                          student_parametrization: Optional[str] = None,
                          allow_stochastic_student: bool = False, check_student_output: bool = False):
    """The PID loss of each sample, float32 (B,) (float64 for float64 noise), differentiable
    w.r.t. the student's weights.

    student: the student as the trainer holds it: the raw network F(x_in, c_noise, labels) or a
        preconditioned network D(x, sigma, labels) (pid_fast's Preconditioning, NVlabs/edm's
        EDMPrecond, ...), bare or wrapped in DDP / FSDP / torch.compile / accelerate; it is
        called through the wrapper. ``student_parametrization`` (None: read from the object;
        "raw", "preconditioned" or "edm") says which it is (pid_fast.loss.student). The boundary
        parametrization x = (t/T) n + (1 - t/T) F is applied here.
    allow_stochastic_student: accept dropout / batch statistics in train mode (an error
        otherwise: the two evaluations would get different masks).
    check_student_output: raise a ValueError naming the likely cause (raw vs preconditioned)
        when the student's outputs are not finite (one host sync; PIDLoss does it on its first
        call).
    teacher: a ``Preconditioning`` (e.g. EDMPrecond, or from ``as_denoiser``) or any callable
        D(x, sigma, labels). It is run without gradient, and with autocast off unless
        ``teacher_precision="bf16"``.
    noise: n = sigma_max z, shape (B, ...). labels: class labels for both networks or None.
    indices: grid indices i (B,) to use instead of drawing them (e.g. to share one draw across
        data-parallel ranks); generator: the generator that draws them otherwise.
    weighting: w(t) -> (B,) weights (None: uniform). noise_labels: the student's c_noise(t)
        (None: the teacher's rule, see ``default_noise_labels``).
    teacher_precision: None (the teacher's own dtype, e.g. fp16 for an EDM ``use_fp16`` teacher
        on CUDA), "fp32" (forced), or "bf16" (its network under bf16 autocast: about half the
        teacher's time on tensor-core GPUs, G within bf16 rounding of the fp32 teacher's).
    derivative: how F(t2) is obtained: "fd" (a second evaluation, the spec) or "jvp" (one
        evaluation at t plus its forward-mode derivative in c_noise, F(t2) = F(t) + dF/dc_noise
        (c_noise(t2) - c_noise(t)): no cancellation of rounded outputs, an O(dt) gap to "fd"
        that vanishes as N grows; see pid_fast.loss.derivative).
    return_times: also return (t, t2).
    """
    sigma_data = resolve_sigma_data(sigma_data, teacher)
    if not isinstance(teacher, Preconditioning):
        teacher = as_denoiser(teacher)
    _check_grid(num_points, sigma_min, sigma_max, rho)
    _check_norm(norm, huber_c, lpips)
    _check_inputs(noise, labels, indices)
    _check_teacher_precision(teacher_precision)
    check_derivative(derivative)
    network, student_labels, how = resolve_student(student, student_parametrization, sigma_data=sigma_data,
                                                   derivative=derivative)
    if student_labels is not None and noise_labels is not None:
        raise ValueError("noise_labels: a preconditioned student computes its own noise labels from sigma = t; "
                         "leave noise_labels unset (or pass the raw network with student_parametrization='raw')")
    eager = not torch.compiler.is_compiling()  # the checks read modules and sync: outside compiled graphs
    if eager:
        check_deterministic(student, allow_stochastic_student)
    noise_labels = student_labels or noise_labels or default_noise_labels(teacher)

    t, t2 = _draw_times(noise, num_points, sigma_min, sigma_max, rho, indices, generator)
    f_t, f_t2 = student_outputs(network, noise, labels, t, t2, noise_labels,
                                1.0 / math.sqrt(sigma_data ** 2 + sigma_max ** 2),
                                derivative=derivative, batched=batched)
    if check_student_output and eager:
        check_first_output(f_t, f_t2, how)
    coef = teacher.coefficients(t)
    teacher_out, guide = _teacher_output(teacher, noise, f_t, t, t / sigma_max, coef, labels,
                                         teacher_precision, backend)
    weight = None if weighting is None else weighting(t).reshape(noise.shape[0]).to(t.dtype)
    per_sample = _per_sample_loss(noise, f_t, f_t2, teacher_out, guide, t, t2, coef, weight,
                                  sigma_max, norm, huber_c, lpips, backend)
    return (per_sample, t, t2) if return_times else per_sample


def _draw_times(noise, num_points, sigma_min, sigma_max, rho, indices, generator):
    """Step 1: grid indices i ~ UniformInt{0..N-1} (or the given ones), i2 = the neighbour
    (N - 2 at i = N - 1), and their times, on the noise's device (no host sync). Times are
    float32 (float64 for float64 noise, e.g. reference checks)."""
    B, dev = noise.shape[0], noise.device
    if indices is None:
        gen_dev = generator.device if generator is not None else dev
        indices = torch.randint(0, num_points, (B,), generator=generator, device=gen_dev)
    i = indices.to(dev)
    i2 = pid_neighbour_index(i, num_points)
    tdtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
    return (grid_times(i, num_points, sigma_min, sigma_max, rho, tdtype),
            grid_times(i2, num_points, sigma_min, sigma_max, rho, tdtype))


def _teacher_output(teacher, noise, f_t, t, a, coef, labels, teacher_precision, backend):
    """Steps 3-4: the teacher's raw output G at (y, t), y = a n + (1 - a) F(t), and for a guided
    teacher (pid_fast.guided) the guide's, with w per sample: (G, None) or (G_m, (G_g, w)). Its
    input c_in y comes from the fused assemble op in the teacher's dtype, detached: no gradient
    through the teacher nor its input."""
    # "bf16": the network's fp32 path under bf16 autocast (also for an fp16 EDM teacher).
    force_fp32 = teacher_precision in ("fp32", "bf16")
    # no_grad rather than inference_mode: inference tensors break torch.compile of a whole step.
    with torch.no_grad():
        teacher_in = _teacher_input(noise, f_t.detach(), a, coef.c_in,
                                    _teacher_dtype(teacher, noise, force_fp32), backend)
        with torch.autocast(noise.device.type, dtype=torch.bfloat16,
                            enabled=teacher_precision == "bf16"):
            if isinstance(teacher, GuidedDenoiser) and not teacher.is_identity:
                # both raw outputs; the fused residual forms G_g + w (G_m - G_g) inside the kernel
                g_main, g_guide = teacher.raw_pair(teacher_in, coef.c_noise, labels, force_fp32=force_fp32)
                return g_main, (g_guide, teacher.guidance_scale(t))
            return teacher.raw(teacher_in, coef.c_noise, labels, force_fp32=force_fp32), None


def _per_sample_loss(noise, f_t, f_t2, teacher_out, guide, t, t2, coef, weight, sigma_max, norm, huber_c,
                     lpips, backend):
    """Step 5: residual and norm in one fused pass (a = t/T, b = 1 - t/T are the ops'
    defaults), or pred/target from the fused residual op and the LPIPS network. ``guide``:
    (G_g, w) of a guided teacher, combined with G_m = teacher_out inside the op."""
    common = dict(sigma_max=float(sigma_max), backend=backend, validate=False)
    if guide is not None:
        common.update(guide_out=guide[0], guide_scale=guide[1])
    if norm != "lpips":
        return pid_loss(noise, f_t, f_t2, teacher_out, t, t2, coef.c_skip, coef.c_out, norm=norm,
                        huber_c=huber_c, weight=weight, **common)
    pred, target = pid_residual(noise, f_t, f_t2, teacher_out, t, t2, coef.c_skip, coef.c_out,
                                **common)
    per_sample = lpips(pred, target).reshape(noise.shape[0]).to(t.dtype)
    return per_sample if weight is None else per_sample * weight


class PIDLoss(nn.Module):
    """Drop-in PID loss: ``loss = pid(student_net, noise, labels)``; ``loss.backward()``.

    teacher: a ``Preconditioning`` (EDMPrecond, VPPrecond, ...) or a callable D(x, sigma,
        labels); it is frozen (eval mode, no gradients) and registered as a submodule so that
        ``.to(device)`` moves it.
    N, sigma_min, sigma_max, rho: the training grid. norm: "l2", "l1", "huber" (with
    ``huber_c``) or "lpips" (with ``lpips``, e.g. ``LPIPSNorm(weights=path)``).
    backend: the fused-op backend (None: by device). batched: one student forward of batch 2B
    (False: two forwards of batch B). teacher_precision: None (the teacher's own dtype), "fp32"
    or "bf16" (the teacher under bf16 autocast; see ``pid_distillation_loss``). derivative: "fd"
    (two student evaluations, the spec) or "jvp" (one evaluation and its forward-mode derivative
    in the noise label; see ``pid_distillation_loss``).
    student_parametrization: None (read from the student object), "raw", "preconditioned" or
    "edm"; allow_stochastic_student: accept train-mode dropout (see ``pid_distillation_loss``).
    The student may be preconditioned and wrapped (DDP, FSDP, torch.compile, accelerate): it is
    called through the wrapper. The first call checks that the student's outputs are finite.
    The module pickles (EDM's training loop pickles its loss into snapshots).

    The call returns the mean loss over the batch; the per-sample values of the last call are
    kept (detached) in ``last_per_sample`` and their times in ``last_t``, ``last_t2``.
    """

    def __init__(self, teacher: Any, N: int = 250, sigma_min: float = 0.002, sigma_max: float = 80.0,
                 rho: float = 7.0, norm: str = "l2", backend: Optional[str] = None, batched: bool = True, *,
                 huber_c: Optional[float] = None, lpips: Optional[Callable] = None,
                 weighting: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 sigma_data: Optional[float] = None,
                 noise_labels: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 teacher_precision: Optional[str] = None, derivative: str = "fd",
                 student_parametrization: Optional[str] = None, allow_stochastic_student: bool = False):
        super().__init__()
        _check_grid(N, sigma_min, sigma_max, rho)
        _check_norm(norm, huber_c, lpips)
        _check_teacher_precision(teacher_precision)
        check_derivative(derivative)
        if not isinstance(batched, bool):
            raise TypeError(f"batched must be a bool, got {type(batched).__name__}")
        if weighting is not None and not callable(weighting):
            raise TypeError(f"weighting must be a callable w(t) -> (B,) or None, got {type(weighting).__name__}")
        check_choice(student_parametrization, "student_parametrization", STUDENT_PARAMETRIZATIONS)
        if not isinstance(allow_stochastic_student, bool):
            raise TypeError(f"allow_stochastic_student must be a bool, got {type(allow_stochastic_student).__name__}")
        sigma_data = resolve_sigma_data(sigma_data, teacher)
        if not isinstance(teacher, Preconditioning):
            teacher = as_denoiser(teacher)
        self.teacher = teacher.eval().requires_grad_(False)
        self.lpips = lpips
        self.N, self.sigma_min, self.sigma_max, self.rho = N, float(sigma_min), float(sigma_max), float(rho)
        self.norm, self.huber_c, self.backend, self.batched = norm, huber_c, backend, batched
        self.weighting = weighting
        self.teacher_precision = teacher_precision
        self.derivative = derivative
        self.sigma_data = sigma_data
        # the student's c_noise(t) for a raw student (a preconditioned one computes its own)
        self.noise_labels = noise_labels or default_noise_labels(teacher)
        self._noise_labels_given = noise_labels is not None
        self.student_parametrization = student_parametrization
        self.allow_stochastic_student = allow_stochastic_student
        self._student_checked = False
        self.last_per_sample: Optional[torch.Tensor] = None
        self.last_t: Optional[torch.Tensor] = None
        self.last_t2: Optional[torch.Tensor] = None

    def train(self, mode: bool = True) -> "PIDLoss":
        super().train(mode)
        self.teacher.eval()  # the teacher is always evaluated deterministically
        return self

    def per_sample(self, student, noise, labels=None, *, indices=None, generator=None) -> torch.Tensor:
        """The per-sample losses (B,) float32 (also stored in ``last_per_sample``)."""
        check = not torch.compiler.is_compiling() and not self._student_checked
        per, t, t2 = pid_distillation_loss(
            student, self.teacher, noise, labels, num_points=self.N, sigma_min=self.sigma_min,
            sigma_max=self.sigma_max, rho=self.rho, sigma_data=self.sigma_data, norm=self.norm,
            huber_c=self.huber_c, lpips=self.lpips, weighting=self.weighting, backend=self.backend,
            batched=self.batched, noise_labels=self.noise_labels if self._noise_labels_given else None,
            indices=indices, generator=generator,
            teacher_precision=self.teacher_precision, derivative=self.derivative, return_times=True,
            student_parametrization=self.student_parametrization,
            allow_stochastic_student=self.allow_stochastic_student, check_student_output=check)
        if check:
            self._student_checked = True
        self.last_per_sample, self.last_t, self.last_t2 = per.detach(), t, t2
        return per

    def forward(self, student, noise, labels=None, *, indices=None, generator=None) -> torch.Tensor:
        return self.per_sample(student, noise, labels, indices=indices, generator=generator).mean()

    def extra_repr(self) -> str:
        return (f"N={self.N}, sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, rho={self.rho}, "
                f"norm={self.norm!r}, backend={self.backend!r}, batched={self.batched}, "
                f"teacher_precision={self.teacher_precision!r}, derivative={self.derivative!r}")
