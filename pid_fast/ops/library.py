"""torch.library glue shared by the compiled ops and the Triton ops: the row layout rule,
the fake (meta) kernels for torch.compile, and the autograd formulas.

Imports nothing of pid_fast: the kernels' modules import this one, never the other way round.
"""

from __future__ import annotations

import torch


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


def _pid_streams(noise, f_t, f_t2, teacher_out, guide_out):
    """The streams whose layout the outputs follow (the guide's too when there is one)."""
    return [noise, f_t, f_t2, teacher_out] + ([guide_out] if guide_out is not None else [])


def _fake_residual(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out, sigma_max,
                   guide_out=None, guide_scale=None):
    streams = _pid_streams(noise, f_t, f_t2, teacher_out, guide_out)
    return rows_like(streams, noise.dtype), rows_like(streams, noise.dtype)


def _fake_loss(noise, f_t, f_t2, teacher_out, t, t2, a1, b1, a2, b2, c_skip, c_out, weight,
               sigma_max, norm, huber_c, need_grad, guide_out=None, guide_scale=None):
    streams = _pid_streams(noise, f_t, f_t2, teacher_out, guide_out)
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
    """Autograd formulas of assemble/residual/loss in namespace ``ns`` (same for every backend,
    the compiled ops included: the LibTorch Stable ABI they are built on has no C++ autograd;
    the backward is a per-row scaling done by the namespace's own ``scale_rows``)."""
    scale_rows = getattr(torch.ops, ns).scale_rows

    def assemble_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # the teacher's input is detached
        ctx.save_for_backward(inputs[3])  # b

    def assemble_backward(ctx, g_x, g_x_in):
        (b,) = ctx.saved_tensors
        g_f = scale_rows(g_x, b) if g_x is not None and ctx.needs_input_grad[1] else None
        return None, g_f, None, None, None, None

    # Inputs after need_grad / sigma_max (the optional guide_out, guide_scale) get no gradient:
    # the target, guided or not, is detached. Backwards return one entry per input.
    def residual_setup(ctx, inputs, output):
        ctx.mark_non_differentiable(output[1])  # the target is detached
        ctx.num_inputs = len(inputs)
        t, t2, a1, b1, a2, b2 = inputs[4:10]
        ctx.save_for_backward(*_per_row_derivatives(t, t2, a1, b1, a2, b2, inputs[12]))

    def residual_backward(ctx, g_pred, g_target):
        s1, s2 = ctx.saved_tensors
        # The target is detached: only pred carries gradient, to F(t) and F(t2).
        g1 = scale_rows(g_pred, s1) if g_pred is not None and ctx.needs_input_grad[1] else None
        g2 = scale_rows(g_pred, s2) if g_pred is not None and ctx.needs_input_grad[2] else None
        return (None, g1, g2) + (None,) * (ctx.num_inputs - 3)

    def loss_setup(ctx, inputs, output):
        _, scale, d1, d2 = output
        ctx.mark_non_differentiable(scale, d1, d2)
        ctx.num_inputs = len(inputs)
        ctx.need_grad = inputs[16]
        if ctx.need_grad:
            ctx.save_for_backward(scale, d1, d2)
        else:  # called with need_grad=False yet differentiated: recompute in backward
            ctx.inputs = inputs

    def loss_backward(ctx, g_loss, *unused):
        if ctx.need_grad:
            scale, d1, d2 = ctx.saved_tensors
        else:
            _, scale, d1, d2 = getattr(torch.ops, ns).loss(*ctx.inputs[:16], True,
                                                           *ctx.inputs[17:])
        g_loss = g_loss.float()
        # dL_b/dF = g_b * factor_b * dir (dir written by the forward pass).
        g1 = scale_rows(d1, g_loss, scale) if ctx.needs_input_grad[1] else None
        g2 = scale_rows(d2, g_loss, scale) if ctx.needs_input_grad[2] else None
        return (None, g1, g2) + (None,) * (ctx.num_inputs - 3)

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
