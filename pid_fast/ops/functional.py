"""The fused PID ops' public functional API: check and promote the inputs, then dispatch.

Data path of one loss call::

    pid_loss(...)                       validate + promote inputs (this file)
      -> torch.ops.pid_fast.loss        C++ CPU / CUDA kernel (csrc/), or
      -> torch.ops.pid_fast_triton.loss Triton kernel (triton_kernels.py), or
      -> reference.loss_ref             plain PyTorch (reference.py)

The fused ``loss`` op returns the per-sample loss and, when gradients are needed, the
gradient directions for F(t) and F(t2) written in the same pass; its backward only scales
them by the incoming gradient (``scale_rows``, see library.py).
"""

from __future__ import annotations

from numbers import Number
from typing import Optional

import torch

from pid_fast.checks import FUSED_NORMS, check_norm, is_number
from pid_fast.ops import reference
from pid_fast.ops.backends import op_namespace, resolve_backend

NORMS = FUSED_NORMS  # norm name -> the code the kernels take


# --------------------------------------------------------------------------------------------
# Input validation (Python errors naming the argument; the C++ ops check again)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _check_stream(name: str, x, ref_name: str | None = None, ref=None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have a batch dimension (B, ...), got a 0-d tensor")
    if ref is not None:
        if x.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)} but {ref_name} has shape "
                             f"{tuple(ref.shape)}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")


def _per_sample(name: str, v, batch: int, device, required=True):
    """A per-sample coefficient as a (B,) float tensor; numbers broadcast to every sample."""
    if v is None:
        if required:
            raise TypeError(f"{name} is required")
        return None
    if isinstance(v, Number) and not isinstance(v, bool):
        return torch.full((batch,), float(v), dtype=torch.float32, device=device)
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({batch},) or a number, "
                        f"got {type(v).__name__}")
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {v.dtype}")
    if v.device != device:
        raise ValueError(f"{name} is on {v.device} but the data tensors are on {device}")
    if v.dim() == 0:
        return v.reshape(1).expand(batch)
    if v.shape != (batch,):
        raise ValueError(f"{name} must be a per-sample vector of shape ({batch},), got shape "
                         f"{tuple(v.shape)}")
    return v


def _values_checkable(*tensors) -> bool:
    """Value checks need a host sync: skip them while compiling or capturing a CUDA graph."""
    if torch.compiler.is_compiling():
        return False
    if any(x.is_cuda for x in tensors) and torch.cuda.is_current_stream_capturing():
        return False
    return True


def _check_times(t, t2, validate: bool) -> None:
    if validate and _values_checkable(t, t2) and bool((t == t2).any()):
        idx = int((t == t2).nonzero()[0])
        raise ValueError(f"t and t2 must differ in every sample (the finite difference divides "
                         f"by t - t2); they are equal at index {idx}")


def _promote(streams: dict, backend: str) -> list:
    """One common floating dtype for the streamed tensors (the fused kernels need it)."""
    dtype = streams[next(iter(streams))].dtype
    for x in streams.values():
        dtype = torch.promote_types(dtype, x.dtype)
    if backend != "reference" and dtype not in _FLOATS:
        raise TypeError(f"the {backend!r} backend takes float32, float16 or bfloat16 tensors, "
                        f"got {dtype}; use backend='reference' for {dtype}")
    return [x if x.dtype == dtype else x.to(dtype) for x in streams.values()]


def _check_sigma_max(sigma_max):
    if isinstance(sigma_max, torch.Tensor) or not is_number(sigma_max) or not sigma_max > 0:
        raise ValueError(f"sigma_max must be a positive number, got {sigma_max!r}")
    return float(sigma_max)


def _coefs(noise, t, t2, c_skip, c_out, a1, b1, a2, b2, sigma_max):
    B, dev = noise.shape[0], noise.device
    t = _per_sample("t", t, B, dev)
    t2 = _per_sample("t2", t2, B, dev)
    ab = [_per_sample(n, v, B, dev, required=False)
          for n, v in (("a1", a1), ("b1", b1), ("a2", a2), ("b2", b2))]
    if any(v is not None for v in ab) and not all(v is not None for v in ab):
        raise ValueError("give all of a1, b1, a2, b2 or none of them (none: a = t/sigma_max, "
                         "b = 1 - t/sigma_max)")
    return (t, t2, *ab, _per_sample("c_skip", c_skip, B, dev), _per_sample("c_out", c_out, B, dev))


# --------------------------------------------------------------------------------------------
# Functional API


def pid_assemble(noise, f, a, b, c_in, *, out_dtype: Optional[torch.dtype] = None,
                 backend: Optional[str] = None):
    """x = a n + b F (the student's state, differentiable w.r.t. ``f``) and the teacher's
    input c_in x (detached, in ``out_dtype``, default the dtype of ``f``)."""
    _check_stream("noise", noise)
    _check_stream("f", f, "noise", noise)
    if out_dtype is not None and out_dtype not in _FLOATS:
        raise TypeError(f"out_dtype must be one of {_FLOATS}, got {out_dtype}")
    backend = resolve_backend(backend, noise.device)
    B, dev = noise.shape[0], noise.device
    a, b, c_in = (_per_sample(n, v, B, dev) for n, v in (("a", a), ("b", b), ("c_in", c_in)))
    noise, f = _promote({"noise": noise, "f": f}, backend)
    if backend == "reference":
        return reference.assemble_ref(noise, f, a, b, c_in, out_dtype)
    return op_namespace(backend).assemble(noise, f, a, b, c_in, out_dtype)


def pid_residual(noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, *, sigma_max=80.0,
                 a1=None, b1=None, a2=None, b2=None, guide_out=None, guide_scale=None,
                 backend: Optional[str] = None, validate: bool = True):
    """pred = y - t (y - y2)/(t - t2) and target = c_skip y + c_out G (detached), for a norm
    computed by another network (LPIPS). Gradients of pred flow to ``f_t`` and ``f_t2``.
    ``guide_out``, ``guide_scale``: a guided teacher, as in :func:`pid_loss`."""
    noise, f_t, f_t2, teacher_out, guide_out, coefs, guide_scale, backend, sigma_max = _prepare(
        noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, sigma_max, a1, b1, a2, b2,
        guide_out, guide_scale, backend, validate)
    if backend == "reference":
        return reference.residual_ref(noise, f_t, f_t2, teacher_out,
                                      *_with_boundary_coefficients(coefs, sigma_max),
                                      guide_out, guide_scale)
    return op_namespace(backend).residual(noise, f_t, f_t2, teacher_out, *coefs, sigma_max,
                                          guide_out, guide_scale)


def pid_loss(noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, *, sigma_max=80.0, norm="l2",
             huber_c=None, weight=None, backend: Optional[str] = None, a1=None, b1=None,
             a2=None, b2=None, guide_out=None, guide_scale=None,
             validate: bool = True) -> torch.Tensor:
    """The PID loss per sample, float32 (B,), differentiable w.r.t. ``f_t`` and ``f_t2``.

    noise: n = T z, (B, ...); f_t, f_t2: the student's raw outputs F at t and t2;
    teacher_out: the teacher's raw output G at (y, t); t, t2, c_skip, c_out, weight: (B,).
    The student is x = a n + b F with a = t/sigma_max, b = 1 - a unless a1, b1, a2, b2 are
    given. norm: "l2", "l1" or "huber" (pseudo-Huber with constant ``huber_c``).
    guide_out, guide_scale: a guided teacher D_w = D_g + w (D_m - D_g) (classifier-free
    guidance, autoguidance): guide_out is the guide's raw output G_g at (y, t) (shape of
    teacher_out, which is then the main teacher's G_m), guide_scale the per-sample w, (B,) or a
    number; the target becomes c_skip y + c_out (w G_m + (1 - w) G_g), formed inside the
    kernel. w = 1 gives the unguided loss exactly. Neither teacher output gets a gradient.
    ``validate=False`` skips the t != t2 check (a host sync on CUDA).
    """
    huber_c = check_norm(norm, huber_c)
    noise, f_t, f_t2, teacher_out, guide_out, coefs, guide_scale, backend, sigma_max = _prepare(
        noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, sigma_max, a1, b1, a2, b2,
        guide_out, guide_scale, backend, validate)
    weight = _per_sample("weight", weight, noise.shape[0], noise.device, required=False)
    if backend == "reference":
        return reference.loss_ref(noise, f_t, f_t2, teacher_out,
                                  *_with_boundary_coefficients(coefs, sigma_max),
                                  norm, huber_c or None, weight, guide_out, guide_scale)
    need_grad = torch.is_grad_enabled() and (f_t.requires_grad or f_t2.requires_grad)
    loss, _, _, _ = op_namespace(backend).loss(noise, f_t, f_t2, teacher_out, *coefs, weight,
                                               sigma_max, FUSED_NORMS[norm], huber_c, need_grad,
                                               guide_out, guide_scale)
    return loss


def _check_guide(guide_out, guide_scale, teacher_out):
    """guide_out and guide_scale come together: a guided teacher needs both."""
    if guide_out is None and guide_scale is None:
        return
    if guide_out is None:
        raise ValueError("guide_scale was given without guide_out (the guide teacher's raw "
                         "output, shaped like teacher_out)")
    if guide_scale is None:
        raise ValueError("guide_out was given without guide_scale (the guidance scale w, a "
                         "number or a per-sample (B,) tensor)")
    _check_stream("guide_out", guide_out, "teacher_out", teacher_out)


def _prepare(noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, sigma_max, a1, b1, a2, b2,
             guide_out, guide_scale, backend, validate):
    _check_stream("noise", noise)
    for name, x in (("f_t", f_t), ("f_t2", f_t2), ("teacher_out", teacher_out)):
        _check_stream(name, x, "noise", noise)
    _check_guide(guide_out, guide_scale, teacher_out)
    sigma_max = _check_sigma_max(sigma_max)
    backend = resolve_backend(backend, noise.device)
    coefs = _coefs(noise, t, t2, c_skip, c_out, a1, b1, a2, b2, sigma_max)
    guide_scale = _per_sample("guide_scale", guide_scale, noise.shape[0], noise.device,
                              required=False)
    _check_times(coefs[0], coefs[1], validate)
    streams = {"noise": noise, "f_t": f_t, "f_t2": f_t2, "teacher_out": teacher_out}
    if guide_out is not None:
        streams["guide_out"] = guide_out
    streams = _promote(streams, backend)
    if guide_out is None:
        streams.append(None)
    return (*streams, coefs, guide_scale, backend, sigma_max)


def _with_boundary_coefficients(coefs, sigma_max):
    """(t, t2, a1, b1, a2, b2, c_skip, c_out) with the spec's a = t/T, b = 1 - t/T filled in
    where the caller gave none (the fused kernels do the same internally)."""
    t, t2, a1, b1, a2, b2, c_skip, c_out = coefs
    if a1 is None:
        a1, b1 = reference.boundary_coefficients(t, sigma_max)
        a2, b2 = reference.boundary_coefficients(t2, sigma_max)
    return t, t2, a1, b1, a2, b2, c_skip, c_out
