"""The student as the user's trainer holds it: the raw network F or a preconditioned network D,
bare or inside DistributedDataParallel / FSDP / torch.compile / accelerate.

PID needs the raw outputs F(c n, c_noise(t), labels). A preconditioned student

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma), labels)

is called through the wrapper the trainer holds, at sigma = t and x = c n / c_in(t), so that its
network sees exactly c n and c_noise(t); F is then recovered as (D - c_skip x) / c_out (the
gradient reaches F unchanged: dF/dF_net = c_out / c_out). Calling the wrapper, never the network
inside it, keeps DDP's gradient all-reduce hooks (reaching ``ddp.module.model`` bypasses them:
every rank then steps with its own gradients). Wrappers are looked through only to read the
type (``unwrap``).

The parametrisation (``student_parametrization``):
    None              read from the object: pid_fast's ``Preconditioning`` and NVlabs/edm's
                      EDMPrecond / VPPrecond / VEPrecond (edm2's Precond) are preconditioned; a
                      diffusers UNet is raw (its ``.sample`` output is taken); any other object is
                      the raw network F, except one that looks preconditioned (a class named
                      '*Precond', a ``sigma_data`` attribute) but is not one of those: an error.
    "raw"             F(x_in, c_noise, labels), called as is.
    "preconditioned"  a recognised preconditioned network (error otherwise).
    "edm"             any D(x, sigma, labels) with EDM's coefficients at the loss's sigma_data.

``stochastic_parts`` lists train-mode randomness (dropout with p > 0, label dropout, batch
statistics) that would give PID's two evaluations F(t), F(t2) different masks.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Optional

import torch
from torch import nn

from pid_fast.checks import check_choice
from pid_fast.models.diffusers_adapter import UNET_CLASSES  # the bare diffusers networks (raw students)
from pid_fast.models.preconditioning import (Coefficients, Preconditioning, declared_sigma_data,
                                             edm_coefficients, edm_preconditioning)

__all__ = ["STUDENT_PARAMETRIZATIONS", "unwrap", "resolve_student", "stochastic_parts", "check_deterministic",
           "PreconditionedStudent", "check_first_output"]

STUDENT_PARAMETRIZATIONS = (None, "raw", "preconditioned", "edm")

_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
# EDM/EDM2/pid_fast style: F.dropout(p=...); diffusers' LabelEmbedding (DiT): dropout_prob
_DROPOUT_ATTRIBUTES = ("dropout", "label_dropout", "dropout_p", "attn_dropout", "dropout_prob")


def _wrapper_classes() -> tuple[type, ...]:
    classes: list[type] = [nn.parallel.DistributedDataParallel, nn.DataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
        classes.append(FullyShardedDataParallel)
    except ImportError:  # a torch build without distributed support
        pass
    return tuple(classes)


_WRAPPERS = _wrapper_classes()


def unwrap(module: Any) -> Any:
    """The module inside DDP / DataParallel / FSDP (``.module``), torch.compile (``._orig_mod``)
    and accelerate's prepare (which returns DDP, or the module itself), for reading its type only.
    (FSDP2's fully_shard keeps the module's own class.)"""
    for _ in range(16):
        if isinstance(module, _WRAPPERS):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module
    return module


def _sigma_label(t: torch.Tensor) -> torch.Tensor:
    # The preconditioned path's "noise label" is sigma itself: the student's own preconditioning
    # turns it into c_noise(t).
    return t


class PreconditionedStudent:
    """F(x_in, sigma, labels) of a preconditioned student, called through ``wrapper`` (see the
    module docstring): x = x_in / c_in(sigma), D = wrapper(x, sigma, labels),
    F = (D - c_skip x) / c_out, in float32 (float64 for float64 inputs)."""

    def __init__(self, wrapper: Callable[..., torch.Tensor], coefficients: Callable[[torch.Tensor], Coefficients]):
        self.wrapper = wrapper
        self.coefficients = coefficients

    def __call__(self, x_in: torch.Tensor, sigma: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        dtype = torch.promote_types(x_in.dtype, torch.float32)
        sigma = sigma.to(dtype)
        coef = self.coefficients(sigma)
        view = (-1,) + (1,) * (x_in.dim() - 1)
        x = x_in.to(dtype) / coef.c_in.reshape(view)
        denoised = _tensor_output(self.wrapper(x, sigma, labels))
        return (denoised.to(dtype) - coef.c_skip.reshape(view) * x) / coef.c_out.reshape(view)


class _DiffusersStudent:
    """A bare diffusers UNet (or its wrapper) as the raw network: its output's ``.sample``."""

    def __init__(self, wrapper: Callable[..., Any]):
        self.wrapper = wrapper

    def __call__(self, x_in: torch.Tensor, c_noise: torch.Tensor, labels: Any = None) -> torch.Tensor:
        out = _tensor_output(self.wrapper(x_in, c_noise, labels))
        # a learned-variance UNet (out_channels = 2 in_channels): its prediction half
        return out[:, :x_in.shape[1]] if out.shape[1] == 2 * x_in.shape[1] else out


def _tensor_output(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)  # diffusers' UNet2DOutput
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return out  # the caller's shape check names what came back


def _looks_preconditioned(module: Any) -> bool:
    return type(module).__name__.endswith("Precond") or declared_sigma_data(module) is not None


def _check_sigma_data(found: Optional[float], sigma_data: float) -> None:
    if found is not None and abs(found - sigma_data) > 1e-9 * max(1.0, abs(sigma_data)):
        raise ValueError(f"sigma_data: the student's preconditioning has sigma_data={found} but the loss uses "
                         f"sigma_data={sigma_data} (PID's c = 1/sqrt(sigma_data^2 + sigma_max^2) and the one-step "
                         f"sampler must use the student's own); pass the same value to both")


def resolve_student(student: Any, parametrization: Optional[str], *, sigma_data: float,
                    derivative: str = "fd") -> tuple[Callable[..., torch.Tensor], Optional[Callable], str]:
    """(the raw-network callable F(x_in, label, labels) the loss evaluates, the noise-label rule it
    must use (None: the loss's own), "raw" or "preconditioned"). See the module docstring."""
    check_choice(parametrization, "student_parametrization", STUDENT_PARAMETRIZATIONS)
    if not callable(student):
        raise TypeError(f"student must be callable (the raw network F(x_in, c_noise, labels) or a preconditioned "
                        f"network D(x, sigma, labels)), got {type(student).__name__}")
    inner = unwrap(student)
    if parametrization == "raw":
        return (_DiffusersStudent(student) if type(inner).__name__ in UNET_CLASSES else student), None, "raw"
    if parametrization == "edm":
        _check_sigma_data(declared_sigma_data(inner), sigma_data)
        coefficients: Callable = partial(edm_coefficients, sigma_data=sigma_data)
    else:
        precond = inner if isinstance(inner, Preconditioning) else edm_preconditioning(inner)
        if precond is None:
            if parametrization == "preconditioned" or _looks_preconditioned(inner):
                raise ValueError(
                    f"student_parametrization: cannot determine how the student {type(inner).__name__} is "
                    f"parametrised (a class named '*Precond' or with a sigma_data attribute, but not one of "
                    f"pid_fast's Preconditioning or NVlabs/edm's EDMPrecond/VPPrecond/VEPrecond); pass "
                    f"student_parametrization='raw' (it is F(x_in, c_noise, labels)) or 'edm' (it is "
                    f"D(x, sigma, labels) with EDM's preconditioning)")
            if type(inner).__name__ in UNET_CLASSES:
                return _DiffusersStudent(student), None, "raw"
            return student, None, "raw"
        _check_sigma_data(declared_sigma_data(precond), sigma_data)
        coefficients = precond.coefficients
    if derivative != "fd":
        raise ValueError(f"derivative={derivative!r} needs the raw network F (its forward-mode derivative is taken "
                         f"in the noise label); pass the raw network (e.g. net.model) with "
                         f"student_parametrization='raw', or use derivative='fd' with a preconditioned student")
    return PreconditionedStudent(student, coefficients), _sigma_label, "preconditioned"


def stochastic_parts(student: Any) -> list[str]:
    """'<module path> (<what>)' for each part of the student that draws random numbers or uses
    batch statistics in its current mode: dropout modules with p > 0, modules with a positive
    ``dropout`` / ``label_dropout`` rate (EDM's and pid_fast's networks call F.dropout), and
    batch norms, all in training mode."""
    module = unwrap(student)
    if not isinstance(module, nn.Module):
        return []
    found = []
    for name, sub in module.named_modules():
        if not sub.training:
            continue
        where = name or type(module).__name__
        if isinstance(sub, _DROPOUT_MODULES):
            if sub.p > 0:
                found.append(f"{where} ({type(sub).__name__} p={sub.p})")
            continue
        if isinstance(sub, _BATCH_NORMS):
            found.append(f"{where} ({type(sub).__name__}: batch statistics)")
            continue
        for attr in _DROPOUT_ATTRIBUTES:
            value = sub.__dict__.get(attr)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                found.append(f"{where} ({attr}={value})")
    return found


def check_deterministic(student: Any, allow_stochastic_student: bool) -> None:
    """ValueError listing ``stochastic_parts`` unless there are none or they are allowed."""
    if allow_stochastic_student:
        return
    parts = stochastic_parts(student)
    if parts:
        shown = ", ".join(parts[:4]) + (f" and {len(parts) - 4} more" if len(parts) > 4 else "")
        raise ValueError(
            f"student: train-mode randomness in {shown}. PID's derivative subtracts two evaluations F(t) - F(t2) "
            f"and multiplies the difference by t/(t - t2) (10-46 at N = 250): different dropout masks (or batch "
            f"statistics) in the two make the loss noise (per-sample losses jump by orders of magnitude). Build "
            f"the student with dropout 0 (e.g. EDM's --dropout=0), put those modules in eval mode (e.g. a DiT's "
            f"label embeddings), or pass allow_stochastic_student=True")


def check_first_output(f_t: torch.Tensor, f_t2: torch.Tensor, how: str) -> None:
    """ValueError when the student's outputs are not finite, naming the likely cause (one host
    sync: for a loss's first call only)."""
    if bool(torch.isfinite(f_t).all()) and bool(torch.isfinite(f_t2).all()):
        return
    if how == "raw":
        cause = ("it was called as the raw network F(c n, c_noise(t), labels). If it is a preconditioned network "
                 "D(x, sigma, labels) (e.g. EDM's EDMPrecond), that call passes c_noise = ln(t)/4 < 0 as its "
                 "sigma: pass student_parametrization='edm' (or 'preconditioned'), or the network inside it")
    else:
        cause = ("it was called as a preconditioned network D(x, sigma, labels) and F recovered as "
                 "(D - c_skip x) / c_out. If it is the raw network F(x_in, c_noise, labels), pass "
                 "student_parametrization='raw'")
    raise ValueError(f"student: its output is not finite on the first call; {cause}. Otherwise check its weights "
                     f"for NaN/inf")
