"""Which student weights to score: the 'auto' EMA rule shared by the demo, `sample` and `fid`."""

from __future__ import annotations

from pid_fast.checks import parse_float

__all__ = ["pick_weights"]


def pick_weights(weights: str, ema_rates, steps: int, max_initial_share: float = 0.15) -> str:
    """The student weights to score. 'model' / 'ema-<rate>' are checked against ``ema_rates``;
    'auto' is the slowest EMA whose remaining share of the initial weights, rate^steps, is at
    most ``max_initial_share`` (the trainer's EMAs start at the student's initial weights, here
    the teacher's, which are a poor one-step student), else 'model'. Decided from the step
    count alone, never from the scores."""
    rates = [float(r) for r in ema_rates]
    if weights == "auto":
        ok = [r for r in rates if r ** steps <= max_initial_share]
        return f"ema-{max(ok)}" if ok else "model"
    if weights == "model" or (isinstance(weights, str) and weights.startswith("ema-")
                              and parse_float(weights[4:]) in rates):
        return weights
    raise ValueError(f"weights must be 'auto', 'model' or 'ema-<rate>' with a rate in {rates}, got {weights!r}")
