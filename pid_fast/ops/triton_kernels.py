"""Triton kernels of the PID ops, registered as ``torch.ops.pid_fast_triton.*`` with the same
schemas and autograd formulas as the C++ ops (``torch.library.triton_op``, so torch.compile
sees through them). On CPU tensors they run only under ``TRITON_INTERPRET=1``.

Grid: (B, chunks per row); a program handles BLOCK elements of one row, so the per-sample
coefficients are scalars in the program. The loss writes one partial sum per program and a
second small kernel reduces them per row (in order: deterministic) and applies the norm.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from pid_fast.ops import library

NS = "pid_fast_triton"


@triton.jit
def _row_coefs(row, t_ptr, t2_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, cs_ptr, co_ptr, gs_ptr,
               sigma_max, HAS_AB: tl.constexpr, HAS_GUIDE: tl.constexpr):
    # pred = pn n + p1 F1 + p2 F2, target = tn n + t1 F1 + tg G (+ tgg Gg with a guide:
    # tg = c_out w, tgg = c_out (1 - w), formed in float64 so w = 1 gives tgg = 0 exactly;
    # see csrc/pid_math.h)
    t = tl.load(t_ptr + row).to(tl.float64)
    t2 = tl.load(t2_ptr + row).to(tl.float64)
    if HAS_AB:
        a1 = tl.load(a1_ptr + row).to(tl.float64)
        b1 = tl.load(b1_ptr + row).to(tl.float64)
        a2 = tl.load(a2_ptr + row).to(tl.float64)
        b2 = tl.load(b2_ptr + row).to(tl.float64)
    else:
        a1 = t / sigma_max
        b1 = 1.0 - a1
        a2 = t2 / sigma_max
        b2 = 1.0 - a2
    k = t / (t - t2)
    cs = tl.load(cs_ptr + row).to(tl.float64)
    pn = ((1.0 - k) * a1 + k * a2).to(tl.float32)
    p1 = ((1.0 - k) * b1).to(tl.float32)
    p2 = (k * b2).to(tl.float32)
    tn = (cs * a1).to(tl.float32)
    t1 = (cs * b1).to(tl.float32)
    if HAS_GUIDE:
        co = tl.load(co_ptr + row).to(tl.float64)
        w = tl.load(gs_ptr + row).to(tl.float64)
        tg = (co * w).to(tl.float32)
        tgg = (co * (1.0 - w)).to(tl.float32)
    else:
        tg = tl.load(co_ptr + row).to(tl.float32)
        tgg = 0.0
    return pn, p1, p2, tn, t1, tg, tgg


@triton.jit
def _load_streams(n_ptr, f1_ptr, f2_ptr, g_ptr, idx, mask):
    """The four streamed tensors at idx, in float32 (0 in masked lanes, so r = 0 there)."""
    n = tl.load(n_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    f1 = tl.load(f1_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    f2 = tl.load(f2_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    return n, f1, f2, g


@triton.jit
def _assemble_kernel(n_ptr, f_ptr, a_ptr, b_ptr, c_ptr, x_ptr, xi_ptr, D, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = row * D + offs
    a = tl.load(a_ptr + row)
    b = tl.load(b_ptr + row)
    c = tl.load(c_ptr + row)
    n = tl.load(n_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(f_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    x = a * n + b * f
    tl.store(x_ptr + idx, x.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(xi_ptr + idx, (c * x).to(xi_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_kernel(n_ptr, f1_ptr, f2_ptr, g_ptr, gg_ptr, pred_ptr, target_ptr,
                     t_ptr, t2_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, cs_ptr, co_ptr, gs_ptr,
                     sigma_max, D, HAS_AB: tl.constexpr, HAS_GUIDE: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = row * D + offs
    pn, p1, p2, tn, t1, tg, tgg = _row_coefs(row, t_ptr, t2_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
                                             cs_ptr, co_ptr, gs_ptr, sigma_max, HAS_AB,
                                             HAS_GUIDE)
    n, f1, f2, g = _load_streams(n_ptr, f1_ptr, f2_ptr, g_ptr, idx, mask)
    pred = pn * n + p1 * f1 + p2 * f2
    target = tn * n + t1 * f1 + tg * g
    if HAS_GUIDE:  # the guide's term last: w = 1 (tgg = 0) leaves the target unchanged
        target += tgg * tl.load(gg_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(pred_ptr + idx, pred.to(pred_ptr.dtype.element_ty), mask=mask)
    tl.store(target_ptr + idx, target.to(target_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _loss_kernel(n_ptr, f1_ptr, f2_ptr, g_ptr, gg_ptr, d1_ptr, d2_ptr, partial_ptr,
                 t_ptr, t2_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr, cs_ptr, co_ptr, gs_ptr,
                 sigma_max, D, nchunks, HAS_AB: tl.constexpr, HAS_GUIDE: tl.constexpr,
                 NORM: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1).to(tl.int64)
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = row * D + offs
    pn, p1, p2, tn, t1, tg, tgg = _row_coefs(row, t_ptr, t2_ptr, a1_ptr, b1_ptr, a2_ptr, b2_ptr,
                                             cs_ptr, co_ptr, gs_ptr, sigma_max, HAS_AB,
                                             HAS_GUIDE)
    n, f1, f2, g = _load_streams(n_ptr, f1_ptr, f2_ptr, g_ptr, idx, mask)
    r = (pn - tn) * n + (p1 - t1) * f1 + p2 * f2 - tg * g  # masked lanes: r = 0
    if HAS_GUIDE:  # the guide's term last: w = 1 (tgg = 0) leaves r unchanged
        r -= tgg * tl.load(gg_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    if NORM == 1:  # l1: |r|, direction sign(r)
        term = tl.abs(r)
        direction = tl.where(r > 0, 1.0, tl.where(r < 0, -1.0, 0.0))
    else:  # l2 / pseudo-Huber: r^2, direction r
        term = r * r
        direction = r
    tl.store(partial_ptr + row * nchunks + ch, tl.sum(term, axis=0))
    if GRAD:
        tl.store(d1_ptr + idx, (p1 * direction).to(d1_ptr.dtype.element_ty), mask=mask)
        tl.store(d2_ptr + idx, (p2 * direction).to(d2_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _finalize_kernel(partial_ptr, w_ptr, loss_ptr, scale_ptr, B, D, nchunks, huber_c,
                     HAS_W: tl.constexpr, NORM: tl.constexpr, GRAD: tl.constexpr,
                     ROWS: tl.constexpr, CHUNKS: tl.constexpr):
    # loss and dL/dr factor per row, as finalize_row in csrc/pid_math.h; the (ROWS, CHUNKS)
    # tile of partial sums is reduced by a fixed tree (deterministic)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    rmask = rows < B
    cols = tl.arange(0, CHUNKS)
    tile = tl.load(partial_ptr + rows[:, None] * nchunks + cols[None, :],
                   mask=rmask[:, None] & (cols[None, :] < nchunks), other=0.0)
    S = tl.sum(tile.to(tl.float64), axis=1)
    if HAS_W:
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float64)
    else:
        w = tl.full([ROWS], 1.0, tl.float64)
    m = S / D
    if NORM == 2:
        root = tl.sqrt(m + huber_c * huber_c)
        loss = w * (root - huber_c)
        scale = w / (D * root)
    else:
        loss = w * m
        scale = (2.0 if NORM == 0 else 1.0) * w / D
    tl.store(loss_ptr + rows, loss.to(tl.float32), mask=rmask)
    if GRAD:
        tl.store(scale_ptr + rows, scale.to(tl.float32), mask=rmask)


@triton.jit
def _scale_rows_kernel(x_ptr, s1_ptr, s2_ptr, out_ptr, D, HAS_S2: tl.constexpr,
                       BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    idx = row * D + offs
    s = tl.load(s1_ptr + row)
    if HAS_S2:
        s = s * tl.load(s2_ptr + row)
    x = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, (x * s).to(out_ptr.dtype.element_ty), mask=mask)


def _launch(kernel):
    """wrap_triton (so torch.compile can trace the launch), except under TRITON_INTERPRET=1,
    where some torch versions (2.11) refuse interpreted kernels; the explicit fake kernels
    registered below make tracing independent of the launch there."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return kernel
    return wrap_triton(kernel)


# --------------------------------------------------------------------------------------------
# Launchers (checks mirror csrc/pid_ops.cpp so direct calls of the ops cannot read out of
# bounds)

_BLOCK = 1024
_ROWS = 128


def _streams(op, named):
    ref_name, ref = named[0]
    if ref.dim() < 1:
        raise ValueError(f"{op}: {ref_name} must have a batch dimension (B, ...)")
    if ref.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{op}: {ref_name} must be float32, float16 or bfloat16, got {ref.dtype}")
    for name, x in named[1:]:
        if x.shape != ref.shape or x.dtype != ref.dtype or x.device != ref.device:
            raise ValueError(f"{op}: {name} ({tuple(x.shape)}, {x.dtype}, {x.device}) must match "
                             f"{ref_name} ({tuple(ref.shape)}, {ref.dtype}, {ref.device})")
    tensors = [x for _, x in named]
    B = ref.shape[0]
    D = ref[0].numel() if B > 0 else 1
    if D == 0:
        raise ValueError(f"{op}: {ref_name} must have at least one element per sample")
    # Keep a shared dense row-contiguous layout (outputs get it too), else go contiguous.
    if not library.shared_row_layout(tensors):
        tensors = [x.contiguous() for x in tensors]
    return tensors, B, D


def _coef(op, name, v, B, device):
    if v is None:
        return None
    if v.shape != (B,) or v.device != device or not v.is_floating_point():
        raise ValueError(f"{op}: {name} must be a floating-point ({B},) tensor on {device}, got "
                         f"{tuple(v.shape)} {v.dtype} on {v.device}")
    return v.to(torch.float32).contiguous()


def _guide(op, guide_out, guide_scale, teacher_out):
    """The guide stream's (name, tensor) and its checked scale; both or neither."""
    if (guide_out is None) != (guide_scale is None):
        raise ValueError(f"{op}: give guide_out and guide_scale together or neither")
    if guide_out is None:
        return [], None
    if (guide_out.shape != teacher_out.shape or guide_out.dtype != teacher_out.dtype
            or guide_out.device != teacher_out.device):
        raise ValueError(f"{op}: guide_out ({tuple(guide_out.shape)}, {guide_out.dtype}, "
                         f"{guide_out.device}) must match teacher_out "
                         f"({tuple(teacher_out.shape)}, {teacher_out.dtype}, "
                         f"{teacher_out.device})")
    B = teacher_out.shape[0] if teacher_out.dim() else 0
    return [("guide_out", guide_out)], _coef(op, "guide_scale", guide_scale, B,
                                              teacher_out.device)


def _pid_coefs(op, B, device, t, t2, a1, b1, a2, b2, c_skip, c_out):
    ab = [a1, b1, a2, b2]
    if any(v is not None for v in ab) and not all(v is not None for v in ab):
        raise ValueError(f"{op}: give all of a1, b1, a2, b2 or none of them")
    names = ("t", "t2", "a1", "b1", "a2", "b2", "c_skip", "c_out")
    cs = [_coef(op, n, v, B, device) for n, v in zip(names, (t, t2, a1, b1, a2, b2, c_skip, c_out))]
    has_ab = a1 is not None
    if not has_ab:  # unused pointers: pass t
        cs[2:6] = [cs[0]] * 4
    return cs, has_ab


# Schemas are inferred from the annotations (the same as the C++ ops' schemas).
T = torch.Tensor
OptT = Optional[torch.Tensor]


@triton_op(f"{NS}::assemble", mutates_args=())
def assemble(noise: T, f: T, a: T, b: T, c_in: T,
             out_dtype: Optional[torch.dtype] = None) -> tuple[T, T]:
    (noise, f), B, D = _streams("assemble", [("noise", noise), ("f", f)])
    a, b, c_in = (_coef("assemble", n, v, B, noise.device)
                  for n, v in (("a", a), ("b", b), ("c_in", c_in)))
    x = library.rows_like([noise, f], noise.dtype)
    x_in = library.rows_like([noise, f], out_dtype or noise.dtype)
    if B > 0:
        _launch(_assemble_kernel)[(B, triton.cdiv(D, _BLOCK))](
            noise, f, a, b, c_in, x, x_in, D, BLOCK=_BLOCK)
    return x, x_in


@triton_op(f"{NS}::residual", mutates_args=())
def residual(noise: T, f_t: T, f_t2: T, teacher_out: T, t: T, t2: T, a1: OptT, b1: OptT,
             a2: OptT, b2: OptT, c_skip: T, c_out: T, sigma_max: float,
             guide_out: OptT = None, guide_scale: OptT = None) -> tuple[T, T]:
    guide, gs = _guide("residual", guide_out, guide_scale, teacher_out)
    streams, B, D = _streams("residual", [("noise", noise), ("f_t", f_t), ("f_t2", f_t2),
                                          ("teacher_out", teacher_out)] + guide)
    coefs, has_ab = _pid_coefs("residual", B, noise.device, t, t2, a1, b1, a2, b2, c_skip, c_out)
    pred = library.rows_like(streams, streams[0].dtype)
    target = library.rows_like(streams, streams[0].dtype)
    has_guide = gs is not None
    main, gg = streams[:4], (streams[4] if has_guide else streams[3])  # unused pointer: G
    if B > 0:
        _launch(_residual_kernel)[(B, triton.cdiv(D, _BLOCK))](
            *main, gg, pred, target, *coefs, gs if has_guide else coefs[0], sigma_max, D,
            HAS_AB=has_ab, HAS_GUIDE=has_guide, BLOCK=_BLOCK)
    return pred, target


@triton_op(f"{NS}::loss", mutates_args=())
def loss(noise: T, f_t: T, f_t2: T, teacher_out: T, t: T, t2: T, a1: OptT, b1: OptT, a2: OptT,
         b2: OptT, c_skip: T, c_out: T, weight: OptT, sigma_max: float, norm: int,
         huber_c: float, need_grad: bool, guide_out: OptT = None,
         guide_scale: OptT = None) -> tuple[T, T, T, T]:
    if norm not in (0, 1, 2) or (norm == 2 and not huber_c > 0):
        raise ValueError(f"loss: bad norm {norm} / huber_c {huber_c}")
    guide, gs = _guide("loss", guide_out, guide_scale, teacher_out)
    streams, B, D = _streams("loss", [("noise", noise), ("f_t", f_t), ("f_t2", f_t2),
                                      ("teacher_out", teacher_out)] + guide)
    dev = noise.device
    coefs, has_ab = _pid_coefs("loss", B, dev, t, t2, a1, b1, a2, b2, c_skip, c_out)
    w = _coef("loss", "weight", weight, B, dev)
    nchunks = triton.cdiv(D, _BLOCK)
    partial = torch.empty((B, nchunks), dtype=torch.float32, device=dev)
    out = torch.empty((B,), dtype=torch.float32, device=dev)
    scale = torch.empty((B if need_grad else 0,), dtype=torch.float32, device=dev)
    if need_grad:
        d1, d2 = library.rows_like(streams, noise.dtype), library.rows_like(streams, noise.dtype)
    else:
        d1, d2 = noise.new_empty((0,)), noise.new_empty((0,))
    if B > 0:
        has_guide = gs is not None
        gg = streams[4] if has_guide else streams[3]  # unused pointer without a guide: G
        _launch(_loss_kernel)[(B, nchunks)](
            *streams[:4], gg, d1 if need_grad else out, d2 if need_grad else out, partial,
            *coefs, gs if has_guide else coefs[0], sigma_max, D, nchunks, HAS_AB=has_ab,
            HAS_GUIDE=has_guide, NORM=norm, GRAD=need_grad, BLOCK=_BLOCK)
        chunks = triton.next_power_of_2(nchunks)
        rows = max(1, min(_ROWS, 8192 // chunks))
        _launch(_finalize_kernel)[(triton.cdiv(B, rows),)](
            partial, w if w is not None else out, out, scale if need_grad else out, B, D,
            nchunks, huber_c, HAS_W=w is not None, NORM=norm, GRAD=need_grad, ROWS=rows,
            CHUNKS=chunks)
    return out, scale, d1, d2


@triton_op(f"{NS}::scale_rows", mutates_args=())
def scale_rows(x: T, s1: T, s2: OptT = None) -> T:
    (x,), B, D = _streams("scale_rows", [("x", x)])
    s1 = _coef("scale_rows", "s1", s1, B, x.device)
    s2 = _coef("scale_rows", "s2", s2, B, x.device)
    out = library.rows_like([x], x.dtype)
    if B > 0:
        _launch(_scale_rows_kernel)[(B, triton.cdiv(D, _BLOCK))](
            x, s1, s2 if s2 is not None else s1, out, D, HAS_S2=s2 is not None, BLOCK=_BLOCK)
    return out


# Explicit fake kernels (rather than tracing the launchers) also let FakeTensor tracing work
# under TRITON_INTERPRET=1, where the interpreter would touch the fake tensors' memory.
library.register_fakes(NS)
library.register_autograd(NS)
