"""Which student weights to score, and scoring every checkpoint of a run.

- ``pick_weights``: the 'auto' EMA rule shared by the demo, `pid-fast sample` and `pid-fast fid`;
- ``checkpoint_info`` / ``load_scored_student``: a checkpoint's step and EMA rates, and its
  student with the weights the rule picks; an EDM snapshot .pkl trained with EDMPIDLoss, or its
  `pid-fast convert` output, is a one-step generator too (``is_edm_generator_file``);
- ``score_checkpoints``: every checkpoint of a run folder with the raw weights and every EMA
  (the reference's protocol), one row per (step, weights); ``fd_scorer`` scores images by their
  distance to the teacher's samples (``metrics.TeacherDistance``: 'fd_teacher', 'rmse_teacher')
  and/or FD (and KID) against a reference; ``write_scores``, ``plot_scores`` and ``best_score``
  turn the rows into a CSV/JSON table, a plot and the winner (`pid-fast fid RUN --all-checkpoints`,
  by 'fd_teacher' when a teacher's samples are given).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from pid_fast.checks import parse_float
from pid_fast.eval import metrics
from pid_fast.eval.plots import plot_fd_over_training
from pid_fast.train import CHECKPOINT_FORMAT, generate, list_checkpoints, load_student
from pid_fast.train.checkpoint import is_sharded_checkpoint

__all__ = ["pick_weights", "checkpoint_info", "newest_checkpoint", "load_scored_student", "is_edm_generator_file",
           "weight_sets",
           "fd_scorer", "score_checkpoints", "best_score", "write_scores", "plot_scores"]


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


def checkpoint_info(path: str | os.PathLike) -> dict[str, Any]:
    """{'step', 'ema_rates'} of a training checkpoint, read through a memory map (the weights
    are not read); of a sharded checkpoint folder, from its meta.pt."""
    path = os.fspath(path)
    if is_sharded_checkpoint(path):
        from pid_fast.train.sharded_checkpoint import read_sharded_meta

        meta = read_sharded_meta(path)
        return {"step": int(meta["step"]), "ema_rates": sorted(float(r) for r in meta["config"]["ema_rates"])}
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint: no such file: {path!r}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as exc:
        raise ValueError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pid_fast training checkpoint")
    return {"step": int(state["step"]), "ema_rates": sorted(float(k) for k in state["ema"])}


def newest_checkpoint(source: str | os.PathLike) -> str:
    """``source`` itself when it is a file or a sharded checkpoint folder, else the newest
    checkpoint of the run folder that reads (the one ``load_student`` would take)."""
    source = os.fspath(source)
    if os.path.isfile(source) or is_sharded_checkpoint(source):
        return source
    if not os.path.isdir(source):
        raise FileNotFoundError(f"checkpoint: no such file or folder: {source!r}")
    for _, path in list_checkpoints(source):
        try:
            checkpoint_info(path)
            return path
        except ValueError:  # a damaged file: the previous one
            continue
    raise FileNotFoundError(f"checkpoint: no readable checkpoint-*.pt in folder {source!r}")


def is_edm_generator_file(source: str | os.PathLike) -> bool:
    """Whether ``source`` is an EDM snapshot (.pkl) or a `pid-fast convert` output (.safetensors)
    rather than a pid_fast training checkpoint or run folder."""
    source = os.fspath(source)
    return os.path.isfile(source) and source.endswith((".pkl", ".safetensors"))


def load_scored_student(source: str | os.PathLike, weights: str = "auto",
                        device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict, str]:
    """(student network, metadata, the weights used) from a checkpoint file or run folder.
    weights: 'auto' (``pick_weights``' rule with the checkpoint's EMA rates and step), 'model',
    'ema' (the slowest EMA) or 'ema-<rate>'. An EDM snapshot or its converted file holds one
    network, its EMA ('auto' or 'ema'): pid_fast.integrations.edm.one_step_generator."""
    if is_edm_generator_file(source):
        from pid_fast.integrations.edm import one_step_generator

        if weights not in ("auto", "ema"):
            raise ValueError(f"weights: {os.fspath(source)} (an EDM snapshot or converted file) holds one network, "
                             f"its EMA; pass 'auto' or 'ema', got {weights!r}")
        net, meta = one_step_generator(source, device=device)
        return net, meta, "ema"
    path = newest_checkpoint(source)
    if weights == "auto":
        info = checkpoint_info(path)
        weights = pick_weights("auto", info["ema_rates"], info["step"])
    net, meta = load_student(path, weights=weights, device=device)
    return net, meta, weights


def weight_sets(ema_rates: Sequence[float]) -> list[str]:
    """'model' and 'ema-<rate>' for each rate, fastest EMA first."""
    return ["model"] + [f"ema-{float(r)!r}" for r in sorted(float(r) for r in ema_rates)]


def fd_scorer(extractor: Callable[[torch.Tensor], torch.Tensor], ref_stats=None,
              ref_feats: Optional[np.ndarray] = None, *, batch: int = 250, device: str | torch.device = "cpu",
              teacher: Optional[metrics.TeacherDistance] = None) -> Callable[[torch.Tensor], dict[str, float]]:
    """A function images -> scores: first, with ``teacher``, the distance to the teacher's samples
    from the same seeds ('fd_teacher', 'rmse_teacher', 'lpips_teacher' with its LPIPS); then, with
    ``ref_stats`` = (mu, sigma), the Frechet distance of the images' features to it ('fd'; plus
    'kid' when reference features are given)."""
    if ref_stats is None and teacher is None:
        raise ValueError("fd_scorer: give ref_stats (the reference's mu, sigma) and/or teacher (its samples)")

    def score(images: torch.Tensor) -> dict[str, float]:
        feats = metrics.features_of(extractor, images, batch=batch, device=device)
        out = teacher.from_features(feats, images) if teacher is not None else {}
        if ref_stats is not None:
            if ref_stats[0].shape[0] != feats.shape[1]:
                raise ValueError(f"reference: {ref_stats[0].shape[0]}-d statistics but the features are "
                                 f"{feats.shape[1]}-d")
            out["fd"] = metrics.fd_from_features(feats, ref_stats)
            if ref_feats is not None:
                out["kid"] = metrics.kernel_distance(feats, ref_feats)
        return out

    return score


def score_checkpoints(run_dir: str | os.PathLike, score: Callable[[torch.Tensor], Mapping[str, float]], *,
                      num: int, seed_start: int = 0, batch: int = 250, device: str | torch.device = "cpu",
                      log: Optional[Callable[[str], None]] = None,
                      seeds: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
    """Every checkpoint of ``run_dir`` (oldest first) with the raw weights and every EMA: one-step
    samples from seeds seed_start .. seed_start + num - 1 (or ``seeds``, e.g. those of a teacher's
    samples; the same for every row), scored by ``score`` (e.g. ``fd_scorer``). Rows: {'step',
    'weights', 'checkpoint', 'num', **score}."""
    checkpoints = sorted(list_checkpoints(run_dir))
    if not checkpoints:
        raise FileNotFoundError(f"run folder {os.fspath(run_dir)!r} holds no checkpoint-*.pt")
    if seeds is not None and len(seeds) != num:
        raise ValueError(f"seeds: {len(seeds)} seeds but num={num}")
    seeds = list(seeds) if seeds is not None else range(seed_start, seed_start + num)
    rows = []
    for step, path in checkpoints:
        for weights in weight_sets(checkpoint_info(path)["ema_rates"]):
            net, meta = load_student(path, weights=weights, device=device)
            images, _ = generate(net, meta, seeds, batch=batch, device=device)
            row = {"step": step, "weights": weights, "checkpoint": path, "num": num, **score(images)}
            rows.append(row)
            if log is not None:
                log("  step {:>9d}  {:<14s} ".format(step, weights)
                    + "  ".join(f"{k} {row[k]:.6g}" for k in row if k not in ("step", "weights", "checkpoint", "num")))
    return rows


def best_score(rows: Sequence[Mapping[str, Any]], key: str = "fd") -> Mapping[str, Any]:
    """The row with the lowest finite ``key``."""
    finite = [r for r in rows if np.isfinite(r[key])]
    if not finite:
        raise ValueError(f"no row has a finite {key!r}")
    return min(finite, key=lambda r: r[key])


def write_scores(rows: Sequence[Mapping[str, Any]], prefix: str | os.PathLike) -> tuple[str, str]:
    """The rows as ``prefix``.csv and ``prefix``.json; returns both paths."""
    prefix = os.fspath(prefix)
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with open(prefix + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    with open(prefix + ".json", "w") as f:
        json.dump(list(rows), f, indent=2, default=float)
    return prefix + ".csv", prefix + ".json"


def plot_scores(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike, *, key: str = "fd",
                ylabel: str = "FD", title: str = "One-step score of each checkpoint") -> str:
    """``key`` against step, one line per weight set (matplotlib); returns the PNG's path."""
    steps = sorted({r["step"] for r in rows})
    by_weights: dict[str, list[float]] = {}
    for r in rows:
        by_weights.setdefault(r["weights"], [float("nan")] * len(steps))[steps.index(r["step"])] = r[key]
    return plot_fd_over_training(steps, by_weights, path, ylabel=ylabel, title=title)
