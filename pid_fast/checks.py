"""One home for the Python-side argument rules.

Every layer (the functional ops, PIDLoss, the samplers, the trainer's config, the CLI, the demo)
calls these, so a rule and its message are written once. Each raises ValueError (TypeError
where the type is wrong) naming the argument as the caller gives it in ``name``: "batch",
"config['loss.N']", "pid_time: num_points". The C++ and Triton entry points keep their own
bounds checks, since they can be called directly.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

# The norms the fused ops compute (code passed to the kernels), and those PIDLoss accepts
# (the fused ones plus LPIPS, computed by another network on pred/target).
FUSED_NORMS = {"l2": 0, "l1": 1, "huber": 2}
LOSS_NORMS = (*FUSED_NORMS, "lpips")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(value: Any, name: str, minimum: int = 1, *, allow_none: bool = False) -> Optional[int]:
    """An int >= ``minimum`` (bools are refused: True is not a count)."""
    if allow_none and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return value


def check_positive(value: Any, name: str, *, allow_zero: bool = False,
                   allow_none: bool = False) -> Optional[float]:
    """A positive (or non-negative) finite number, as a float."""
    if allow_none and value is None:
        return None
    if not is_number(value) or not (value >= 0 if allow_zero else value > 0):
        kind = "a non-negative" if allow_zero else "a positive"
        raise ValueError(f"{name} must be {kind} finite number{' or None' if allow_none else ''}, "
                         f"got {value!r}")
    return float(value)


def check_choice(value: Any, name: str, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_grid(num_points: Any, sigma_min: Any, sigma_max: Any, rho: Any, *, where: str = "",
               num_points_name: str = "N (num_points)") -> None:
    """The PID/EDM time grid: N >= 2 points between 0 < sigma_min < sigma_max, rho > 0."""
    check_int(num_points, where + num_points_name, 2)
    check_sigma_range(sigma_min, sigma_max, rho, where=where)


def check_sigma_range(sigma_min: Any, sigma_max: Any, rho: Any, *, where: str = "") -> None:
    for name, value in (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho)):
        check_positive(value, where + name)
    if not sigma_min < sigma_max:
        raise ValueError(f"{where}sigma_min ({sigma_min}) must be smaller than sigma_max ({sigma_max})")


def check_norm(norm: Any, huber_c: Any, *, norms: Sequence[str] = tuple(FUSED_NORMS),
               lpips: Any = None, where: str = "") -> float:
    """The norm and its constant: huber_c > 0 with 'huber' and only there; an LPIPS callable
    with 'lpips' and only there. Returns huber_c as a float (0.0 for the other norms)."""
    check_choice(norm, where + "norm", norms)
    if norm == "huber":
        if not is_number(huber_c) or not huber_c > 0:
            raise ValueError(f"{where}huber_c must be a positive number for norm='huber', got {huber_c!r}")
        out = float(huber_c)
    elif huber_c is not None:
        raise ValueError(f"{where}huber_c is only used with norm='huber' (norm={norm!r})")
    else:
        out = 0.0
    if "lpips" in norms:
        if norm == "lpips" and not callable(lpips):
            raise ValueError("norm='lpips' needs lpips=<a callable (pred, target) -> (B,) losses>, e.g. "
                             "pid_fast.eval.lpips.LPIPSNorm(weights='/path/to/vgg16.pth')")
        if norm != "lpips" and lpips is not None:
            raise ValueError(f"lpips is only used with norm='lpips' (norm={norm!r})")
    return out


def parse_float(text: str) -> Optional[float]:
    """``float(text)``, or None when the text is not a number."""
    try:
        return float(text)
    except (TypeError, ValueError):
        return None
