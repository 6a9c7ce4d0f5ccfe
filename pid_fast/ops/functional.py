"""The fused PID ops: backend choice, torch.library registrations and the functional API.

Data path of one loss call::

    pid_loss(...)                       validate + promote inputs (this file)
      -> torch.ops.pid_fast.loss        C++ CPU / CUDA kernel (csrc/), or
      -> torch.ops.pid_fast_triton.loss Triton kernel (pid_fast/triton_ops.py), or
      -> reference.loss_ref             plain PyTorch (pid_fast/reference.py)

The fused ``loss`` op returns the per-sample loss and, when gradients are needed, the
gradient directions for F(t) and F(t2) written in the same pass; its backward only scales
them by the incoming gradient (``scale_rows``).
"""

from __future__ import annotations

import importlib.util
import os
from numbers import Number
from typing import Optional

import torch

from pid_fast.ops import extension as _ext, reference

BACKENDS = ("reference", "cpu", "cuda", "triton")
NORMS = {"l2": 0, "l1": 1, "huber": 2}
ENV_BACKEND = "PID_FAST_BACKEND"


# --------------------------------------------------------------------------------------------
# Backends


_HAS_TRITON = importlib.util.find_spec("triton") is not None  # once: dynamo won't trace find_spec


def triton_available() -> bool:
    return _HAS_TRITON


def build_info() -> dict:
    """What this installation can run: the compiled CPU/CUDA kernels (with CUDA archs), Triton."""
    info = {"torch": torch.__version__, **_COMPILED}
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    else:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


_ext.load()
_COMPILED = _ext.compiled_info()  # read once: torch.compile traces the backend choice


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    out = ["reference"]
    info = _COMPILED
    if device.type == "cpu":
        out.append("cpu")
        if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    elif device.type == "cuda":
        if info["cuda"]:
            out.append("cuda")
        if triton_available():
            out.append("triton")
    return out


def resolve_backend(backend: Optional[str], device: torch.device | str) -> str:
    """The one place that picks a backend: the argument, else $PID_FAST_BACKEND, else by device
    (CPU tensors -> "cpu", CUDA tensors -> "cuda"). An unavailable choice is an error."""
    device = torch.device(device)
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get(ENV_BACKEND) or None, f"${ENV_BACKEND}"
    if backend is None:
        backend, source = {"cpu": "cpu", "cuda": "cuda"}.get(device.type), "default"
        if backend is None:
            raise ValueError(f"pid_fast has no kernels for device type {device.type!r}; "
                             "pass backend='reference' to use plain PyTorch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (from {source})")
    avail = available_backends(device)
    if backend not in avail:
        why = ""
        if backend == "cuda" and device.type == "cuda":
            why = (" pid_fast was built without CUDA kernels (build_info()['cuda'] is False);"
                   " rebuild with a CUDA toolkit (CUDA_HOME, PID_FAST_CUDA=1) or use"
                   " backend='triton'.")
        elif backend == "triton" and not triton_available():
            why = " Triton is not installed."
        elif backend == "triton" and device.type == "cpu":
            why = " Triton runs on CPU tensors only under TRITON_INTERPRET=1."
        raise ValueError(f"backend {backend!r} (from {source}) is not available for "
                         f"{device.type} tensors; available: {avail}.{why}")
    return backend


def _ops(backend: str):
    """The op namespace of a fused backend."""
    if backend in ("cpu", "cuda"):
        _ext.load()
        return torch.ops.pid_fast
    from pid_fast.ops import triton_kernels  # noqa: F401  (registers torch.ops.pid_fast_triton)

    return torch.ops.pid_fast_triton


# --------------------------------------------------------------------------------------------
# torch.library registrations shared by the C++ ops and the Triton ops


def shared_row_layout(streams) -> bool:
    """Whether the streams share one dense layout in which each sample is a contiguous block
    of memory (NCHW and channels_last both are): the kernels then use it without copies."""
    ref = streams[0]
    B = ref.shape[0]
    D = ref[0].numel() if B > 0 else 1
    shared = _dense(ref) and (B <= 1 or ref.stride(0) == D)
    return shared and all(s.stride() == ref.stride() for s in streams)


def _dense(x) -> bool:
    """Non-overlapping and dense: the elements fill numel() consecutive memory slots."""
    expected = 1
    dims = sorted(((st, sz) for sz, st in zip(x.shape, x.stride()) if sz != 1))
    for stride, size in dims:
        if stride != expected:
            return False
        expected *= size
    return True


def rows_like(streams, dtype):
    """An output with the streams' layout when they share one (see shared_row_layout), else
    contiguous, as the C++ ops allocate. Used by the fake kernels and the Triton ops."""
    ref = streams[0]
    if shared_row_layout(streams):
        return torch.empty_strided(ref.shape, ref.stride(), dtype=dtype, device=ref.device)
    return torch.empty(ref.shape, dtype=dtype, device=ref.device)


def _fake_assemble(noise, f, a, b, c_in, out_dtype=None):
    return rows_like([noise, f], noise.dtype), rows_like([noise, f], out_dtype or noise.dtype)


def _fake_residual(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out, sigma_max):
    streams = [noise, f_t, f_t2, teacher_out]
    return rows_like(streams, noise.dtype), rows_like(streams, noise.dtype)


def _fake_loss(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out, weight,
               sigma_max, norm, huber_c, need_grad):
    streams = [noise, f_t, f_t2, teacher_out]
    B = noise.shape[0]
    loss = noise.new_empty((B,), dtype=torch.float32)
    scale = noise.new_empty((B if need_grad else 0,), dtype=torch.float32)
    if need_grad:
        return loss, scale, rows_like(streams, noise.dtype), rows_like(streams, noise.dtype)
    return loss, scale, noise.new_empty((0,)), noise.new_empty((0,))


def _fake_scale_rows(x, s1, s2=None):
    return rows_like([x], x.dtype)


def _per_row_derivatives(t, t2, a1, b1, a2, b2, sigma_max):
    """d pred/d F(t) = b1 (1 - k) and d pred/d F(t2) = b2 k, with k = t/(t - t2)."""
    def f32(x):  # no aten::to call when already float32 (an op must not return its input)
        return x if x.dtype == torch.float32 else x.float()

    t, t2 = f32(t), f32(t2)
    if b1 is None:
        b1, b2 = 1.0 - t / sigma_max, 1.0 - t2 / sigma_max
    k = t / (t - t2)
    return f32(b1) * (1.0 - k), f32(b2) * k


def register_autograd(ns: str) -> None:
    """Autograd formulas of assemble/residual/loss in namespace ``ns`` (same for every backend:
    the backward is a per-row scaling done by the namespace's own ``scale_rows``)."""
    scale_rows = getattr(torch.ops, ns).scale_rows

    def assemble_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # the teacher's input is detached
        ctx.save_for_backward(inputs[3])  # b

    def assemble_backward(ctx, g_x, g_x_in):
        (b,) = ctx.saved_tensors
        g_f = scale_rows(g_x, b) if g_x is not None and ctx.needs_input_grad[1] else None
        return None, g_f, None, None, None, None

    def residual_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # the target is detached
        t, t2, a1, b1, a2, b2 = inputs[4:10]
        ctx.save_for_backward(*_per_row_derivatives(t, t2, a1, b1, a2, b2, inputs[12]))

    def residual_backward(ctx, g_pred, g_target):
        s1, s2 = ctx.saved_tensors
        # The target is detached: only pred carries gradient, to F(t) and F(t2).
        g1 = scale_rows(g_pred, s1) if g_pred is not None and ctx.needs_input_grad[1] else None
        g2 = scale_rows(g_pred, s2) if g_pred is not None and ctx.needs_input_grad[2] else None
        return (None, g1, g2) + (None,) * 10

    def loss_setup(ctx, inputs, output):
        _, scale, d1, d2 = output
        ctx.mark_non_differentiable(scale, d1, d2)
        ctx.need_grad = inputs[16]
        if ctx.need_grad:
            ctx.save_for_backward(scale, d1, d2)
        else:  # called with need_grad=False yet differentiated: recompute in backward
            ctx.inputs = inputs

    def loss_backward(ctx, g_loss, *unused):
        if ctx.need_grad:
            scale, d1, d2 = ctx.saved_tensors
        else:
            _, scale, d1, d2 = getattr(torch.ops, ns).loss(*ctx.inputs[:16], True)
        g_loss = g_loss.float()
        # dL_b/dF = g_b * factor_b * dir (dir written by the forward pass).
        g1 = scale_rows(d1, g_loss, scale) if ctx.needs_input_grad[1] else None
        g2 = scale_rows(d2, g_loss, scale) if ctx.needs_input_grad[2] else None
        return (None, g1, g2) + (None,) * 14

    torch.library.register_autograd(f"{ns}::assemble", assemble_backward,
                                    setup_context=assemble_setup)
    torch.library.register_autograd(f"{ns}::residual", residual_backward,
                                    setup_context=residual_setup)
    torch.library.register_autograd(f"{ns}::loss", loss_backward, setup_context=loss_setup)


def register_fakes(ns: str) -> None:
    """Shape/layout functions of the ops in ``ns`` for FakeTensor tracing (torch.compile)."""
    for name, fn in (("assemble", _fake_assemble), ("residual", _fake_residual),
                     ("loss", _fake_loss), ("scale_rows", _fake_scale_rows)):
        torch.library.register_fake(f"{ns}::{name}")(fn)


_ext.load()
register_fakes("pid_fast")  # the C++ ops' autograd kernels are in csrc/pid_autograd.cpp


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


def _check_norm(norm: str, huber_c):
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {tuple(NORMS)}, got {norm!r}")
    if norm == "huber":
        if huber_c is None or not float(huber_c) > 0:
            raise ValueError(f"huber_c must be a positive number for norm='huber', got {huber_c!r}")
        return float(huber_c)
    if huber_c is not None:
        raise ValueError(f"huber_c is only used with norm='huber' (norm={norm!r})")
    return 0.0


def _check_sigma_max(sigma_max):
    if not isinstance(sigma_max, Number) or not sigma_max > 0:
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
    return _ops(backend).assemble(noise, f, a, b, c_in, out_dtype)


def pid_residual(noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, *, sigma_max=80.0,
                 a1=None, b1=None, a2=None, b2=None, backend: Optional[str] = None,
                 validate: bool = True):
    """pred = y - t (y - y2)/(t - t2) and target = c_skip y + c_out G (detached), for a norm
    computed by another network (LPIPS). Gradients of pred flow to ``f_t`` and ``f_t2``."""
    noise, f_t, f_t2, teacher_out, coefs, backend, sigma_max = _prepare(
        noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, sigma_max, a1, b1, a2, b2, backend,
        validate)
    if backend == "reference":
        t, t2, a1, b1, a2, b2, c_skip, c_out = coefs
        if a1 is None:
            a1, b1 = reference.boundary_coefficients(t, sigma_max)
            a2, b2 = reference.boundary_coefficients(t2, sigma_max)
        return reference.residual_ref(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2,
                                      c_skip, c_out)
    return _ops(backend).residual(noise, f_t, f_t2, teacher_out, *coefs, sigma_max)


def pid_loss(noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, *, sigma_max=80.0, norm="l2",
             huber_c=None, weight=None, backend: Optional[str] = None, a1=None, b1=None,
             a2=None, b2=None, validate: bool = True) -> torch.Tensor:
    """The PID loss per sample, float32 (B,), differentiable w.r.t. ``f_t`` and ``f_t2``.

    noise: n = T z, (B, ...); f_t, f_t2: the student's raw outputs F at t and t2;
    teacher_out: the teacher's raw output G at (y, t); t, t2, c_skip, c_out, weight: (B,).
    The student is x = a n + b F with a = t/sigma_max, b = 1 - a unless a1, b1, a2, b2 are
    given. norm: "l2", "l1" or "huber" (pseudo-Huber with constant ``huber_c``).
    ``validate=False`` skips the t != t2 check (a host sync on CUDA).
    """
    huber_c = _check_norm(norm, huber_c)
    noise, f_t, f_t2, teacher_out, coefs, backend, sigma_max = _prepare(
        noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, sigma_max, a1, b1, a2, b2, backend,
        validate)
    weight = _per_sample("weight", weight, noise.shape[0], noise.device, required=False)
    if backend == "reference":
        t, t2, a1, b1, a2, b2, c_skip, c_out = coefs
        if a1 is None:
            a1, b1 = reference.boundary_coefficients(t, sigma_max)
            a2, b2 = reference.boundary_coefficients(t2, sigma_max)
        return reference.loss_ref(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip,
                                  c_out, norm, huber_c or None, weight)
    need_grad = torch.is_grad_enabled() and (f_t.requires_grad or f_t2.requires_grad)
    loss, _, _, _ = _ops(backend).loss(noise, f_t, f_t2, teacher_out, *coefs, weight, sigma_max,
                                       NORMS[norm], huber_c, need_grad)
    return loss


def _prepare(noise, f_t, f_t2, teacher_out, t, t2, c_skip, c_out, sigma_max, a1, b1, a2, b2,
             backend, validate):
    _check_stream("noise", noise)
    for name, x in (("f_t", f_t), ("f_t2", f_t2), ("teacher_out", teacher_out)):
        _check_stream(name, x, "noise", noise)
    sigma_max = _check_sigma_max(sigma_max)
    backend = resolve_backend(backend, noise.device)
    coefs = _coefs(noise, t, t2, c_skip, c_out, a1, b1, a2, b2, sigma_max)
    _check_times(coefs[0], coefs[1], validate)
    streams = _promote({"noise": noise, "f_t": f_t, "f_t2": f_t2, "teacher_out": teacher_out},
                       backend)
    return (*streams, coefs, backend, sigma_max)
