"""Plain-PyTorch reference of the PID elementwise stages, written as the spec's equations.

Every fused backend (C++ CPU, CUDA, Triton) is tested against these functions. They are also a
backend of their own (``backend="reference"``): slow, but always available and differentiable
through ordinary autograd.

Shapes: tensors are (B, ...); every coefficient is a per-sample vector of shape (B,).
Arithmetic is done in float32 (float64 if an input is float64) whatever the storage dtype;
results are stored in the inputs' dtype, losses are float32 (B,).
"""

from __future__ import annotations

import torch

from pid_fast.checks import FUSED_NORMS

NORMS = tuple(FUSED_NORMS)


def _rows(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-sample vector (B,) viewed as (B, 1, 1, ...) to broadcast against ``like``."""
    return v.reshape(-1, *([1] * (like.dim() - 1)))


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32


def boundary_coefficients(t: torch.Tensor, sigma_max: float):
    """Student parametrization x = a n + b F with a = t/T, b = 1 - t/T (x(T) = n exactly)."""
    a = t / sigma_max
    return a, 1.0 - a


def assemble_ref(noise, f, a, b, c_in, out_dtype=None):
    """x = a n + b F (the student's ODE state) and the teacher's input c_in x, detached."""
    cd = _compute_dtype(noise, f)
    x = _rows(a, f).to(cd) * noise.to(cd) + _rows(b, f).to(cd) * f.to(cd)
    x_in = (_rows(c_in, f).to(cd) * x.detach()).to(out_dtype or f.dtype)
    return x.to(f.dtype), x_in


def guided_output(teacher_out, guide_out, guide_scale):
    """The guided teacher's raw output G_w = w G_m + (1 - w) G_g (= G_g + w (G_m - G_g)), so
    that with shared c_skip, c_out the denoiser is D_w = D_g + w (D_m - D_g).

    Written as w G_m + (1 - w) G_g so that w = 1 gives G_m and w = 0 gives G_g exactly."""
    w = _rows(guide_scale, teacher_out).to(teacher_out.dtype)
    return w * teacher_out + (1 - w) * guide_out.to(teacher_out.dtype)


def residual_ref(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out,
                 guide_out=None, guide_scale=None):
    """pred = y - t dy/dt with dy/dt = (y - y2)/(t - t2), and target = c_skip y + c_out G.

    With a guide (guide_out G_g and its per-sample scale w, both or neither) G is the guided
    G_w = w G_m + (1 - w) G_g, G_m = teacher_out. The target carries no gradient (neither
    through the teachers nor through their input y).
    """
    if (guide_out is None) != (guide_scale is None):
        raise ValueError("give guide_out and guide_scale together or neither")
    cd = _compute_dtype(noise, f_t, f_t2, teacher_out)
    n, g = noise.to(cd), teacher_out.to(cd)
    if guide_out is not None:
        g = guided_output(g, guide_out.to(cd), guide_scale)
    t, t2 = _rows(t, f_t).to(cd), _rows(t2, f_t).to(cd)
    y = _rows(a1, f_t).to(cd) * n + _rows(b1, f_t).to(cd) * f_t.to(cd)
    y2 = _rows(a2, f_t).to(cd) * n + _rows(b2, f_t).to(cd) * f_t2.to(cd)
    dydt = (y - y2) / (t - t2)
    pred = y - t * dydt
    target = _rows(c_skip, f_t).to(cd) * y.detach() + _rows(c_out, f_t).to(cd) * g.detach()
    return pred.to(f_t.dtype), target.to(f_t.dtype)


def reduce_ref(pred, target, norm="l2", huber_c=None, weight=None):
    """Per-sample distance d(pred, target), times an optional per-sample weight; float32 (B,)."""
    r = (pred.to(_compute_dtype(pred)) - target.to(_compute_dtype(pred))).reshape(pred.shape[0], -1)
    if norm == "l2":
        loss = r.square().mean(1)
    elif norm == "l1":
        loss = r.abs().mean(1)
    elif norm == "huber":  # pseudo-Huber: sqrt(||r||^2/dim + c^2) - c
        loss = torch.sqrt(r.square().mean(1) + huber_c**2) - huber_c
    else:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    if weight is not None:
        loss = loss * weight.to(loss.dtype)
    return loss if loss.dtype == torch.float64 else loss.float()


def loss_ref(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out,
             norm="l2", huber_c=None, weight=None, guide_out=None, guide_scale=None):
    """The PID loss per sample: reduce(residual(...)), evaluated without rounding pred/target
    to the storage dtype in between (the fused kernels keep them in float32 registers).
    guide_out, guide_scale: the guided teacher, as in residual_ref."""
    cd = _compute_dtype(noise, f_t, f_t2, teacher_out)
    up = [x.to(cd) for x in (noise, f_t, f_t2, teacher_out)]
    if guide_out is not None:
        guide_out = guide_out.to(cd)
    pred, target = residual_ref(*up, t, t2, a1, b1, a2, b2, c_skip, c_out, guide_out,
                                guide_scale)
    return reduce_ref(pred, target, norm, huber_c, weight)
