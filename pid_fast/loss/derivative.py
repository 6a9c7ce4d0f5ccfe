"""The student's two outputs F(t), F(t2) that the residual's time derivative is formed from.

    "fd"   two evaluations, F(c n, c_noise(t)) and F(c n, c_noise(t2)) (the spec; one forward of
           batch 2B when ``batched``). The residual's dy/dt = (y - y2)/(t - t2) then subtracts two
           nearly equal outputs and multiplies the difference by t/(t - t2) (10-46 at N = 250), so
           each evaluation's rounding is amplified that much: in 16-bit autocast F(t) - F(t2) is
           mostly rounding noise (benchmarks/results/fd_precision.md).
    "jvp"  one evaluation at t and its directional derivative in the noise label, by forward-mode
           AD (dual tensors, torch.autograd.forward_ad: c_noise carries the tangent 1). Then

               F(t2) := F(t) + dF/dc_noise * (c_noise(t2) - c_noise(t))

           is the first-order expansion of F(t2) about t, and the fused ops take it unchanged: the
           residual's (y - y2)/(t - t2) becomes the derivative carried forward, with no cancellation
           of two rounded outputs. The two modes differ by the expansion's remainder,
           O((c_noise(t2) - c_noise(t))^2) in F(t2), i.e. O(dt) in dy/dt (the discretisation gap;
           up to ~1% of pred at N = 250 on the digits network, benchmarks/results/jvp_precision.md),
           and agree as N grows; as N -> infinity both give the paper's continuous ODE residual.

Gradients reach the student's weights through F(t) and through the tangent (reverse mode over
the forward-mode pass: the dual tensors' primal and tangent are ordinary autograd tensors). F(t2)
is formed in float32 (float64 for float64 outputs) whatever the network's output dtype, so a
16-bit F(t) does not round the small step away, and c_noise(t2) - c_noise(t) is taken in float64
from the same t, t2 the fused ops use.

Forward-mode coverage: every op of SongUNet (DDPM++/NCSN++), DhariwalUNet and the digits network
has a forward-mode formula except these, which run on math paths during the jvp pass only
(forward_ad_ops.py): scaled_dot_product_attention (its fused kernels have none) and softmax (its
formula breaks the backward through the tangent, pytorch/pytorch#162350); group_norm and
layer_norm, whose float16 formulas overflow to NaN tangents (16-bit norms run in float32 there).
Dual tensors rather than torch.func.jvp: the student is called as it is, so DDP (which copies
buffers in place at each forward, refused inside torch.func transforms) works. Under torch.compile the jvp pass runs
eagerly (a graph break: dynamo cannot trace make_dual), so fullgraph=True is not available.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD

from pid_fast.checks import check_choice
from pid_fast.loss.forward_ad_ops import ForwardADMathPaths

__all__ = ["DERIVATIVES", "check_derivative", "student_outputs"]

DERIVATIVES = ("fd", "jvp")


def check_derivative(derivative, name: str = "derivative") -> str:
    """``derivative`` if it is one of DERIVATIVES (ValueError naming ``name`` otherwise)."""
    return check_choice(derivative, name, DERIVATIVES)


def student_outputs(student: Callable[..., torch.Tensor], noise: torch.Tensor,
                    labels: Optional[torch.Tensor], t: torch.Tensor, t2: torch.Tensor,
                    noise_labels: Callable[[torch.Tensor], torch.Tensor], c: float, *,
                    derivative: str = "fd", batched: bool = True):
    """(F(t), F(t2)): the student's raw outputs at (c n, c_noise(t)) and (c n, c_noise(t2)),
    evaluated twice ("fd") or once plus the first-order expansion by a JVP ("jvp"; ``batched``
    plays no part there). Both carry gradients to the student's weights."""
    check_derivative(derivative)
    B = noise.shape[0]
    x_in = noise * c
    c_noise_t = noise_labels(t).reshape(B)
    if derivative == "jvp":
        return _jvp_pair(student, x_in, labels, c_noise_t, _label_step(noise_labels, t, t2, B))
    return _fd_pair(student, x_in, labels, c_noise_t, noise_labels(t2).reshape(B), batched)


def _check_output(out, shape, name: str) -> None:
    if not isinstance(out, torch.Tensor) or out.shape != shape:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"student output ({name}) must have shape {tuple(shape)}, got {got}")


def _fd_pair(student, x_in, labels, c_noise_t, c_noise_t2, batched):
    """Two evaluations: one forward of batch 2B (``batched``), else two forwards of batch B."""
    B = x_in.shape[0]
    if batched:
        both_labels = None if labels is None else torch.cat([labels, labels])
        out = student(torch.cat([x_in, x_in]), torch.cat([c_noise_t, c_noise_t2]), both_labels)
        _check_output(out, (2 * B, *x_in.shape[1:]), "batch 2B")
        return out[:B], out[B:]
    f_t, f_t2 = student(x_in, c_noise_t, labels), student(x_in, c_noise_t2, labels)
    _check_output(f_t, x_in.shape, "f_t")
    _check_output(f_t2, x_in.shape, "f_t2")
    return f_t, f_t2


def _label_step(noise_labels, t, t2, batch):
    """c_noise(t2) - c_noise(t) in float64, from the (rounded) t, t2 the residual divides by."""
    return (noise_labels(t2.double()) - noise_labels(t.double())).reshape(batch)


# Dynamo cannot trace make_dual (torch 2.14: an internal assert), so under torch.compile the
# forward-mode pass runs eagerly, as a graph break; the teacher and the fused ops still compile.
@torch.compiler.disable
def _jvp_pair(student, x_in, labels, c_noise_t, label_step):
    """F(t) and F(t) + dF/dc_noise * step from one forward-mode evaluation at t."""
    try:
        with ForwardADMathPaths(), fwAD.dual_level():
            out = student(x_in, fwAD.make_dual(c_noise_t, torch.ones_like(c_noise_t)), labels)
            f_t, tangent = fwAD.unpack_dual(out) if isinstance(out, torch.Tensor) else (out, None)
    except NotImplementedError as exc:
        raise NotImplementedError(f"derivative='jvp': the student uses an op without a forward-mode "
                                  f"AD formula; give it a math path or use derivative='fd' ({exc})") from exc
    _check_output(f_t, x_in.shape, "f_t")
    if tangent is None:  # the output does not depend on c_noise
        tangent = torch.zeros_like(f_t)
    # Form F(t2) in at least float32: in a 16-bit dtype the step (~1e-2 of F) would round away.
    dtype = torch.promote_types(f_t.dtype, torch.float32)
    view = (-1,) + (1,) * (f_t.dim() - 1)
    f_t = f_t.to(dtype)
    return f_t, f_t + tangent.to(dtype) * label_step.to(dtype).reshape(view)
