"""Weights blended with the student's initial weights, chosen after training.

A PID student starts as a copy of the teacher. Interpolating the trained weights back toward
those initial weights, (1 - share) w + share w_init (WiSE-FT's weight-space interpolation), is a
post-hoc choice like an EMA length: on the digits teacher at a 400-step budget, share 0.2 moves
the one-step FD from 2.3x to 1.09x the teacher's (benchmarks/results/convergence.md).

``initial_weights`` rebuilds the initial weights from a checkpoint's config (the teacher's for
init "teacher", the seeded fresh ones for init "random"); ``write_teacher_shares`` writes the
blends as checkpoints that `pid-fast sample` and `pid-fast fid --all-checkpoints` read
(`pid-fast teacher-share` on the command line).
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import torch

from pid_fast.train.checkpoint import CHECKPOINT_FORMAT, atomic_save, checkpoint_path, read_checkpoint
from pid_fast.train.generate import checkpoint_weights

__all__ = ["check_share", "initial_weights", "blend_with_initial", "write_teacher_shares"]


def check_share(share) -> float:
    """A share of the initial weights: a number in [0, 1)."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
        raise ValueError(f"share must be a number in [0, 1), got {share!r}")
    return float(share)


def initial_weights(config: Mapping) -> dict[str, torch.Tensor]:
    """The student's weights at step 0 of the run with this (resolved) config, on the CPU."""
    from pid_fast.train.builders import build_student, build_teacher

    teacher, teacher_net = build_teacher(config["teacher"], torch.device("cpu"))
    net, _ = build_student(config["student"], teacher, teacher_net, torch.device("cpu"))
    return {k: v.detach() for k, v in net.state_dict().items()}


def blend_with_initial(state_dict: Mapping[str, torch.Tensor], initial: Mapping[str, torch.Tensor],
                       share: float) -> dict[str, torch.Tensor]:
    """(1 - share) x state_dict + share x initial, key by key (integer buffers kept as trained)."""
    share = check_share(share)
    if set(state_dict) != set(initial):
        missing = sorted(set(state_dict) ^ set(initial))[:3]
        raise ValueError(f"the initial weights do not match the checkpoint's (keys differ, e.g. {missing})")
    return {k: torch.lerp(v, initial[k].to(v), share) if v.is_floating_point() else v
            for k, v in state_dict.items()}


def write_teacher_shares(checkpoint: str | os.PathLike, shares: Sequence[float], out_dir: str | os.PathLike,
                         weights: str = "model", initial: Optional[Mapping[str, torch.Tensor]] = None) -> list[str]:
    """For each share, ``<out_dir>/share-<s>/checkpoint-<step>.pt`` whose 'model' is the
    checkpoint's ``weights`` ('model', 'ema' or 'ema-<rate>') blended with the run's initial
    weights (rebuilt from the checkpoint's config unless given). Returns the paths written."""
    shares = [check_share(s) for s in shares]
    state = read_checkpoint(os.fspath(checkpoint))
    if "config" not in state:
        raise ValueError(f"{checkpoint}: no training config stored (not a `pid-fast distill` checkpoint)")
    trained = checkpoint_weights(state, weights, os.fspath(checkpoint))
    initial = initial_weights(state["config"]) if initial is None else initial
    written = []
    for share in shares:
        blended = blend_with_initial(trained, initial, share)
        path = checkpoint_path(os.path.join(os.fspath(out_dir), f"share-{float(share):.4f}"), int(state["step"]))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save({"format": CHECKPOINT_FORMAT, "step": state["step"], "student": state["student"],
                     "model": blended, "ema": {}, "teacher_share": {"share": float(share), "weights": weights,
                                                                   "source": os.fspath(checkpoint)}}, path)
        written.append(path)
    return written
