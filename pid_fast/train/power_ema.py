"""EDM2's power-function EMA (Karras et al., "Analyzing and Improving the Training Dynamics of
Diffusion Models", 2024, section 3) and its post-hoc reconstruction: the EMA length is chosen
after training instead of guessed before it.

A power-function EMA with exponent gamma averages the whole history with weights growing as
tau^gamma: after t optimizer steps

    theta_hat(t) = int_0^t tau^gamma theta(tau) dtau / int_0^t tau^gamma dtau,

so its length grows with training (no bias towards the initial weights at any step). Updated
once per step with beta_t = (1 - 1/t)^(gamma + 1), step t = 1, 2, ...: the weight it then gives
to the weights after step k is (k^(g+1) - (k-1)^(g+1)) / t^(g+1), exactly the profile
p(tau) = (g+1) tau^g / t^(g+1) integrated over (k-1, k]. Its length is named by sigma_rel, the
standard deviation of the profile relative to t: sigma_rel^2 = (g+1) / ((g+2)^2 (g+3)).

Reconstruction. Each stored snapshot i (exponent g_i, step t_i) is the weights integrated against
its profile p_i, so a combination sum_i x_i snapshot_i is the weights against sum_i x_i p_i. For
a wanted profile p_r (any sigma_rel, any step t_r), x minimises the L2 distance
int (sum_i x_i p_i - p_r)^2 dtau, i.e. solves A x = b with the closed forms

    A_ij = int p_i p_j = (g_i+1)(g_j+1) min(t_i, t_j)^(g_i+g_j+1) / ((g_i+g_j+1) t_i^(g_i+1) t_j^(g_j+1)),
    b_i  = the same with j -> r

(least squares, since A is ill-conditioned when snapshots are close). Times are divided by the
largest one first (no overflow of t^(2g+1)).

The trainer (config['power_ema']) tracks one power EMA per sigma_rel, keeps them in its
checkpoints and writes them every ``snapshot_every`` steps to ``power-ema-<step>.pt``;
``reconstruct`` / ``write_reconstructions`` (`pid-fast power-ema`) build any EMA length from
those files, as a checkpoint that ``load_student`` and `pid-fast fid --all-checkpoints` read.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pid_fast.train.checkpoint import CHECKPOINT_FORMAT, atomic_save, checkpoint_path, numbered_files
from pid_fast.train.ema import EMA, update_ema

__all__ = ["SNAPSHOT_FORMAT", "sigma_rel_to_gamma", "gamma_to_sigma_rel", "PowerEMA", "snapshot_path",
           "save_snapshot", "list_snapshots", "solve_coefficients", "reconstruct", "write_reconstructions"]

SNAPSHOT_FORMAT = "pid_fast.power_ema/1"


def gamma_to_sigma_rel(gamma: float) -> float:
    """The relative standard deviation of the power-function profile with exponent gamma."""
    g = float(gamma)
    return float(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))))


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma > -1 whose profile has relative standard deviation ``sigma_rel``: the
    largest real root of sigma^2 (g+2)^2 (g+3) - (g+1) = 0, i.e. of
    sigma^2 g^3 + 7 sigma^2 g^2 + (16 sigma^2 - 1) g + 12 sigma^2 - 1."""
    if isinstance(sigma_rel, bool) or not 0 < float(sigma_rel) < 12 ** -0.5:  # gamma -> -1: sigma_rel -> 0.2887
        raise ValueError(f"sigma_rel must be in (0, 0.2887), got {sigma_rel!r}")
    s2 = float(sigma_rel) ** 2
    roots = np.roots([s2, 7 * s2, 16 * s2 - 1, 12 * s2 - 1])
    real = roots[np.abs(roots.imag) < 1e-9].real
    return float(real[real > -1].max())


class PowerEMA(EMA):
    """One power-function EMA of a network per sigma_rel, updated after every optimizer step
    (``update(model, step)`` with the step count after that update, 1, 2, ...). Copies, keys and
    state dicts as ``EMA``'s; only the per-step rate differs."""

    what = "power EMA with sigma_rel"

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]):
        super().__init__(model, sigma_rels)
        self.sigma_rels = self.rates
        self.gammas = [sigma_rel_to_gamma(s) for s in self.sigma_rels]

    def update(self, model: nn.Module, step: int) -> None:
        for sigma_rel, gamma in zip(self.sigma_rels, self.gammas):
            # step 1: rate 0, the average starts at theta_1
            update_ema(self.models[sigma_rel], model, (1.0 - 1.0 / step) ** (gamma + 1))


# --------------------------------------------------------------------------------------------
# Snapshot files


def snapshot_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"power-ema-{step:09d}.pt")


def save_snapshot(run_dir: str, step: int, power_ema: PowerEMA, student_meta: Mapping[str, Any],
                  state: Optional[Mapping[str, Any]] = None) -> str:
    """Write the power EMAs of ``step`` to ``power-ema-<step>.pt`` (atomically); its path.
    ``state``: their full state dict when it is not ``power_ema.state_dict()`` (sharded EMAs,
    gathered by pid_fast.train.sharding.full_state_dict)."""
    path = snapshot_path(run_dir, step)
    atomic_save({"format": SNAPSHOT_FORMAT, "step": int(step), "sigma_rels": power_ema.sigma_rels,
                 "gammas": power_ema.gammas, "student": dict(student_meta),
                 "ema": power_ema.state_dict() if state is None else dict(state)}, path)
    return path


def list_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the power-EMA snapshots of ``run_dir``, oldest first."""
    return sorted(numbered_files(run_dir, "power-ema"))


# --------------------------------------------------------------------------------------------
# Post-hoc reconstruction


def _profile_products(gammas_a, steps_a, gammas_b, steps_b) -> np.ndarray:
    """int_0^inf p_a(tau) p_b(tau) dtau for every pair (a, b), p(tau) = (g+1) tau^g / t^(g+1) on (0, t]."""
    ga, ta = np.asarray(gammas_a, np.float64)[:, None], np.asarray(steps_a, np.float64)[:, None]
    gb, tb = np.asarray(gammas_b, np.float64)[None, :], np.asarray(steps_b, np.float64)[None, :]
    g = ga + gb + 1
    return (ga + 1) * (gb + 1) * np.minimum(ta, tb) ** g / (g * ta ** (ga + 1) * tb ** (gb + 1))


def solve_coefficients(gammas: Sequence[float], steps: Sequence[int], gamma: float, step: int) -> np.ndarray:
    """The coefficients x of the snapshots (exponents ``gammas`` at ``steps``) whose combination
    best matches the power EMA with exponent ``gamma`` at ``step`` (least squares, see above)."""
    if len(gammas) != len(steps) or not len(steps):
        raise ValueError("solve_coefficients: needs one gamma per snapshot step, and at least one snapshot")
    scale = float(max(max(steps), step))  # times in units of the latest one: no overflow of t^(2g+1)
    t = np.asarray(steps, np.float64) / scale
    A = _profile_products(gammas, t, gammas, t)
    b = _profile_products(gammas, t, [gamma], [step / scale])[:, 0]
    return np.linalg.lstsq(A, b, rcond=None)[0]


def _snapshot_terms(run_dir: str, step: int) -> tuple[list[float], list[int], list[tuple[str, str]]]:
    """The (gamma, step, (path, key)) of every stored power EMA at or before ``step``."""
    gammas, steps, where = [], [], []
    for snap_step, path in list_snapshots(run_dir):
        if snap_step > step:
            continue
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if state.get("format") != SNAPSHOT_FORMAT:
            raise ValueError(f"{path}: not a pid_fast power-EMA snapshot")
        for sigma_rel, gamma in zip(state["sigma_rels"], state["gammas"]):
            gammas.append(float(gamma))
            steps.append(snap_step)
            where.append((path, PowerEMA.key(sigma_rel)))
    return gammas, steps, where


def _stored_snapshots(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    snapshots = list_snapshots(run_dir)
    if not snapshots:
        raise FileNotFoundError(f"run folder {os.fspath(run_dir)!r} holds no power-ema-*.pt snapshots (config "
                                f"power_ema.sigma_rels and power_ema.snapshot_every)")
    return snapshots


def reconstruct(run_dir: str | os.PathLike, sigma_rel: float, step: Optional[int] = None) -> tuple[dict, dict]:
    """(state dict, info) of the power EMA with ``sigma_rel`` at ``step`` (default: the newest
    snapshot's), rebuilt from the snapshots of ``run_dir`` taken at or before ``step``. info:
    step, sigma_rel, gamma, the snapshots used and their coefficients, the student metadata."""
    snapshots = _stored_snapshots(run_dir)
    step = snapshots[-1][0] if step is None else int(step)
    gamma = sigma_rel_to_gamma(sigma_rel)
    gammas, steps, where = _snapshot_terms(os.fspath(run_dir), step)
    if not steps:
        raise ValueError(f"no power-EMA snapshot at or before step {step} in {run_dir!r}")
    coefficients = solve_coefficients(gammas, steps, gamma, step)
    total: Optional[dict] = None
    meta: dict = {}
    for x, (path, key) in zip(coefficients, where):
        state = torch.load(path, map_location="cpu", weights_only=True)
        meta = state["student"]
        weights = state["ema"][key]
        if total is None:
            total = {k: v.double() * float(x) if v.is_floating_point() else v.clone() for k, v in weights.items()}
        else:
            for k, v in weights.items():
                if v.is_floating_point():
                    total[k] += v.double() * float(x)
    state_dict = {k: v.float() if v.is_floating_point() else v for k, v in total.items()}
    info = {"step": step, "sigma_rel": float(sigma_rel), "gamma": gamma, "student": meta,
            "terms": [{"path": p, "sigma_rel": float(k), "step": s, "coefficient": float(x)}
                      for x, (p, k), s in zip(coefficients, where, steps)]}
    return state_dict, info


def write_reconstructions(run_dir: str | os.PathLike, sigma_rels: Sequence[float], out_dir: str | os.PathLike,
                          steps: Optional[Sequence[int]] = None) -> list[str]:
    """For each sigma_rel and step (default: every snapshot's step), the reconstructed power EMA
    as a training checkpoint ``<out_dir>/sigma_rel-<s>/checkpoint-<step>.pt`` whose 'model' is
    the reconstruction (``load_student(path)``; `pid-fast fid <out_dir>/sigma_rel-<s>
    --all-checkpoints` scores them against step). Returns the paths written."""
    steps = [s for s, _ in _stored_snapshots(run_dir)] if steps is None else list(steps)
    written = []
    for sigma_rel in sigma_rels:
        folder = os.path.join(os.fspath(out_dir), f"sigma_rel-{float(sigma_rel):.4f}")
        os.makedirs(folder, exist_ok=True)
        for step in steps:
            state_dict, info = reconstruct(run_dir, sigma_rel, step)
            path = checkpoint_path(folder, step)
            atomic_save({"format": CHECKPOINT_FORMAT, "step": step, "student": info["student"], "model": state_dict,
                         "ema": {}, "power_ema_reconstruction": {k: v for k, v in info.items() if k != "student"}},
                        path)
            written.append(path)
    return written
