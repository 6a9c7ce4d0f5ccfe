"""Pictures a user would rather look at than read (matplotlib, Agg, no display needed):

- ``plot_loss_curve``: the PID loss over training (from the trainer's log.jsonl);
- ``plot_fd_over_training``: the student's one-step FD at each checkpoint, with the teacher's
  numbers as horizontal references;
- ``plot_fd_vs_n``: the analytic teacher's endpoint error / FD of the one-step student against
  the grid size N (``pid_fast.demo.analytic_sweep.sweep_n``), with Euler on PID's grid as the floor;
- ``save_comparison_grid``: student and teacher samples from the same noise, side by side.

Every function writes a PNG and returns its path. Figures are built with
``matplotlib.figure.Figure`` (no pyplot global state), so they are safe in any process.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

__all__ = ["read_log", "plot_loss_curve", "plot_fd_over_training", "plot_fd_vs_n", "save_comparison_grid"]


def _figure(width: float = 6.4, height: float = 4.0):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig, path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not path.lower().endswith(".png"):
        raise ValueError(f"path: expected a .png file name, got {path!r}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of a trainer log.jsonl that carry a loss ({'step', 'loss', ...})."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"log: no such file: {path!r}")
    rows = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(row, dict) and "loss" in row and "step" in row:
                rows.append(row)
    return rows


def plot_loss_curve(log: str | os.PathLike | Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                    title: str = "PID loss") -> str:
    """Loss against step (log scale) from a log.jsonl path or a list of {'step', 'loss'} rows."""
    rows = read_log(log) if isinstance(log, (str, os.PathLike)) else list(log)
    if not rows:
        raise ValueError("log: no {'step', 'loss'} entries to plot")
    steps = np.array([r["step"] for r in rows], dtype=float)
    loss = np.array([r["loss"] for r in rows], dtype=float)
    fig = _figure()
    ax = fig.add_subplot()
    ax.plot(steps, loss, marker="o", ms=3, lw=1.5, color="tab:blue")
    if np.all(loss[np.isfinite(loss)] > 0):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean over the logging window)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, path)


def plot_fd_over_training(steps: Sequence[float], fds: Mapping[str, Sequence[float]], path: str | os.PathLike, *,
                          references: Optional[Mapping[str, float]] = None, ylabel: str = "digits FD",
                          title: str = "One-step FD during distillation") -> str:
    """One line per entry of ``fds`` (label -> FD at each step) and a dashed horizontal line per
    entry of ``references`` (label -> FD, e.g. the teacher's Heun and Euler samplers)."""
    steps = np.asarray(list(steps), dtype=float)
    if steps.ndim != 1 or steps.size == 0:
        raise ValueError("steps: expected a non-empty sequence of numbers")
    fig = _figure()
    ax = fig.add_subplot()
    values = []
    for label, ys in fds.items():
        ys = np.asarray(list(ys), dtype=float)
        if ys.shape != steps.shape:
            raise ValueError(f"fds[{label!r}]: expected {steps.size} values (one per step), got {ys.size}")
        ax.plot(steps, ys, marker="o", ms=3, lw=1.5, label=label)
        values.extend(ys[np.isfinite(ys)])
    colors = ["tab:green", "tab:red", "tab:purple", "tab:gray"]
    for k, (label, value) in enumerate((references or {}).items()):
        ax.axhline(float(value), ls="--", lw=1.2, color=colors[k % len(colors)], label=f"{label} ({value:.1f})")
        values.append(float(value))
    if values and min(values) > 0 and max(values) / min(values) > 20:
        ax.set_yscale("log")
    ax.set_xlabel("distillation step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_fd_vs_n(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *,
                 title: str = "Analytic teacher (Gaussian mixture): one-step student vs exact ODE") -> str:
    """Endpoint RMSE and FD of the one-step student against N (log-log), from
    ``pid_fast.demo.analytic_sweep.sweep_n`` rows, with Euler on PID's grid (N - 1 steps) for reference."""
    rows = sorted(rows, key=lambda r: r["N"])
    if not rows:
        raise ValueError("rows: nothing to plot")
    N = np.array([r["N"] for r in rows], dtype=float)
    fig = _figure(9.0, 3.8)
    for k, (key, euler_key, label) in enumerate((("rmse", "euler_rmse", "endpoint RMSE vs exact x(sigma_min)"),
                                                  ("fd", "euler_fd", "FD vs exact endpoints"))):
        ax = fig.add_subplot(1, 2, k + 1)
        ax.plot(N, [r[key] for r in rows], marker="o", lw=1.5, label="PID student, 1 step")
        if all(euler_key in r for r in rows):
            ax.plot(N, [r[euler_key] for r in rows], marker="s", ms=3, ls="--", lw=1,
                    label="Euler on PID's grid (N-1 steps)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("grid size N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def _tile(x: torch.Tensor, cols: int) -> np.ndarray:
    # [B, C, H, W] in [-1, 1] -> one [rows*(H+1)-1, cols*(W+1)-1, C] image in [0, 1] with 1-pixel gaps.
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) / 2).numpy()
    B, C, H, W = x.shape
    rows = int(math.ceil(B / cols))
    out = np.ones((rows * (H + 1) - 1, cols * (W + 1) - 1, C), dtype=np.float32)
    for k in range(B):
        r, c = divmod(k, cols)
        out[r * (H + 1):r * (H + 1) + H, c * (W + 1):c * (W + 1) + W] = x[k].transpose(1, 2, 0)
    return out


def save_comparison_grid(panels: Mapping[str, torch.Tensor], path: str | os.PathLike, *, cols: int = 8,
                         title: Optional[str] = None) -> str:
    """Side-by-side panels (label -> batch [B, C, H, W] in [-1, 1], the same B noises in the
    same order in every panel), e.g. {'PID student, 1 step': ..., 'teacher, Heun 35 NFE': ...}."""
    if not panels:
        raise ValueError("panels: nothing to draw")
    shapes = {tuple(v.shape) for v in panels.values()}
    if len(shapes) != 1:
        raise ValueError(f"panels: every panel must have the same shape, got {sorted(shapes)}")
    for label, x in panels.items():
        if not isinstance(x, torch.Tensor) or x.ndim != 4:
            raise ValueError(f"panels[{label!r}]: expected a [B, C, H, W] tensor")
    tiles = {label: _tile(x, min(cols, x.shape[0])) for label, x in panels.items()}
    h, w = next(iter(tiles.values())).shape[:2]
    panel_w = 3.2
    fig = _figure(panel_w * len(panels), panel_w * h / w + (0.9 if title else 0.5))
    for k, (label, img) in enumerate(tiles.items()):
        ax = fig.add_subplot(1, len(panels), k + 1)
        ax.imshow(img[..., 0] if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(label, fontsize=9)
        ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)
