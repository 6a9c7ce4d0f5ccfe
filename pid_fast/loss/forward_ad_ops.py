"""Math paths for the ops whose forward-mode AD fails a PID student's jvp pass, used only there.

    scaled_dot_product_attention  its fused kernels (CPU flash attention, chosen under bf16/fp16
                                  autocast; CUDA flash / memory-efficient attention) have no
                                  forward-mode formula
    softmax                       its forward-mode formula (shared with log_softmax/logsumexp)
                                  writes in place into a tensor that the backward needs, so the
                                  backward through the tangent fails ("modified by an inplace
                                  operation", pytorch/pytorch#162350)
    group_norm, layer_norm        on float16 inputs their forward-mode formulas overflow: the
                                  tangent is formed in float16 with rstd**3 (rstd = 100 for
                                  activations of std 0.01 gives 1e6 > 65504), so the tangent is
                                  NaN while the primal is fine

``ForwardADMathPaths`` is a TorchFunctionMode that, while active, computes the first two with
ordinary differentiable ops (exp, sum, div, matmul), whose forward-mode formulas support the
backward, and the norms of 16-bit inputs in float32 (what their kernels do with the statistics
anyway), rounding the result back to the input's dtype.
The attention's arithmetic follows what autocast + a fused kernel does: inputs rounded to the
dtype SDPA would compute in (the autocast dtype under autocast), products, softmax and
accumulation in float32 (float64 for float64 inputs), output in that dtype.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["ForwardADMathPaths", "ForwardADAttention", "math_attention", "math_softmax", "float32_norm"]


def math_softmax(x: torch.Tensor, dim: int, dtype=None) -> torch.Tensor:
    """softmax(x) along ``dim`` as exp(x - max) / sum: differentiable forward-mode formulas only."""
    if dtype is not None:
        x = x.to(dtype)
    e = (x - x.amax(dim, keepdim=True).detach()).exp()  # the shift cancels; no gradient needed
    return e / e.sum(dim, keepdim=True)


def _sdpa_dtype(q: torch.Tensor) -> torch.dtype:
    device = q.device.type
    if torch.is_autocast_enabled(device) and q.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)  # SDPA is on autocast's lower-precision list
    return q.dtype


def math_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """F.scaled_dot_product_attention's result by explicit products and ``math_softmax``."""
    if dropout_p or enable_gqa:
        raise NotImplementedError("derivative='jvp': scaled_dot_product_attention with dropout_p > 0 or "
                                  "enable_gqa has no math path here")
    out_dtype = _sdpa_dtype(q)
    compute = torch.promote_types(out_dtype, torch.float32)
    q, k, v = (x.to(out_dtype).to(compute) for x in (q, k, v))
    with torch.autocast(q.device.type, enabled=False):
        scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = (scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool
                      else scores + attn_mask.to(compute))
        return (math_softmax(scores, -1) @ v).to(out_dtype)


def float32_norm(norm, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``norm(x, ...)`` (F.group_norm / F.layer_norm) computed in float32 for a 16-bit ``x``
    (weight and bias too), returned in ``x``'s dtype; other dtypes as they are."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return norm(x, *args, **kwargs)
    up = [a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    kw = {k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
    with torch.autocast(x.device.type, enabled=False):
        return norm(x.float(), *up, **kw).to(x.dtype)


_SOFTMAX = {torch.softmax, F.softmax, torch.Tensor.softmax}
_NORMS = {F.group_norm, F.layer_norm, torch.group_norm, torch.layer_norm}


class ForwardADMathPaths(TorchFunctionMode):
    """While active: scaled_dot_product_attention and softmax by their math paths, 16-bit
    group/layer norms in float32."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return math_attention(*args, **kwargs)
        if func in _SOFTMAX:
            return _softmax_call(*args, **kwargs)
        if func in _NORMS:
            return float32_norm(func, *args, **kwargs)
        return func(*args, **kwargs)


ForwardADAttention = ForwardADMathPaths  # its first name (attention and softmax only)


def _softmax_call(x, dim=None, _stacklevel=3, dtype=None):
    if dim is None:  # F.softmax's legacy implicit dim is not supported here
        raise NotImplementedError("derivative='jvp': softmax without an explicit dim")
    return math_softmax(x, dim, dtype)
