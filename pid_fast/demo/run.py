"""`pid-fast demo`: PID end to end on the CPU, offline, in about ten minutes.

``run_demo`` checks its options (into a ``pid_fast.demo.settings.DemoRun``), then runs four stages:

1. ``baselines``: the teacher's EDM Heun sampler with 18 steps (35 network evaluations) and a
   single Euler step on fixed seeds, and the real digits; their distance to the teacher's Heun
   samples (FD between the two sample sets, and the per-pixel RMSE to the Heun sample from the
   same noise), then their digits FD / KID against the 1797 real digits (features of the bundled
   digits classifier, ``pid_fast.eval.digits``).
2. ``distill``: PID-distil a one-step student from the teacher with ``pid_fast.train.train``
   (the same trainer as ``pid-fast distill``), in chunks; after each chunk the student's
   one-step FD to the teacher's samples and to the data are measured, so the run also yields
   curves over training, and a time
   budget can stop it early on a slow machine (at a chunk boundary; ``--resume`` continues it).
3. ``score``: the student's one-step samples from the same seeds, with the chosen weights.
4. ``report``: pictures (student vs teacher from the same noise, the loss curve, FD over
   training and, optionally, the analytic Gaussian-mixture teacher's error against N from
   ``pid_fast.demo.analytic_sweep``), ``summary.json`` and the printed table.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable, Iterator, Optional

import torch

import pid_fast.demo.analytic_sweep as analytic_sweep
from pid_fast.checks import check_int, check_positive
from pid_fast.data.digits import load_digits
from pid_fast.demo.files import DEFAULT_FEATURES, DEFAULT_TEACHER
from pid_fast.demo.settings import DEMO_DEFAULTS, DemoRun, demo_config
from pid_fast.demo.teacher import load_digits_teacher
from pid_fast.eval.checkpoints import pick_weights
from pid_fast.eval.metrics import (DigitsFeatures, TeacherDistance, digits_reference_features, fd_from_features,
                                   kernel_distance)
from pid_fast.eval.plots import plot_fd_over_training, plot_fd_vs_n, plot_loss_curve, save_comparison_grid
from pid_fast.sampling import euler_sample, heun_sample, seeded_latents
from pid_fast.train import generate, list_checkpoints, load_student, resolve_config, train
from pid_fast.train.threads import choose_threads, pick_threads, recorded_threads
from pid_fast.train.teacher_share import blend_with_initial

__all__ = ["DEMO_DEFAULTS", "DemoRun", "demo_config", "pick_weights", "run_demo", "baselines", "distill", "score",
           "report", "format_table"]


class DigitsScorer:
    """Scores of [B, 1, 16, 16] image batches in the feature space of the digits classifier at
    ``features_path``: first the distance to the teacher's Heun samples from the run's seeds
    (``use_teacher``; FD between the two sets, and the per-pixel RMSE to the Heun sample from the
    same noise: how well a one-step sampler reproduces the teacher's ODE solution, not just its
    distribution), then FD and KID against the 1797 real digits."""

    def __init__(self, features_path: str):
        self.features = DigitsFeatures(features_path)
        self.teacher: Optional[TeacherDistance] = None

    def use_teacher(self, heun_images: torch.Tensor) -> None:
        self.teacher = TeacherDistance(heun_images, self.features)

    def fd(self, images: torch.Tensor) -> float:
        return fd_from_features(self.features.features(images), digits_reference_features(self.features))

    def curves(self, images: torch.Tensor) -> dict[str, float]:
        """{'fd_teacher', 'fd'} of samples from the run's seeds (the FD-over-training points)."""
        feats = self.features.features(images)
        return {"fd_teacher": fd_from_features(feats, self.teacher.stats),
                "fd": fd_from_features(feats, digits_reference_features(self.features))}

    def __call__(self, images: torch.Tensor, same_noise: bool = True) -> dict[str, float]:
        """{'fd_teacher', 'rmse_to_heun' (samples from the run's seeds only: ``same_noise``), 'fd',
        'kid'}."""
        feats, ref = self.features.features(images), digits_reference_features(self.features)
        out: dict[str, float] = {}
        if self.teacher is not None:
            out["fd_teacher"] = fd_from_features(feats, self.teacher.stats)
            if same_noise:
                out["rmse_to_heun"] = self.teacher.from_features(feats, images)["rmse_teacher"]
        return {**out, "fd": fd_from_features(feats, ref), "kid": kernel_distance(feats, ref)}


def run_demo(out_dir: str | os.PathLike = "pid-demo", *, steps: int = DEMO_DEFAULTS["steps"],
             batch_size: int = DEMO_DEFAULTS["batch_size"], lr: float = DEMO_DEFAULTS["lr"],
             N: int = DEMO_DEFAULTS["N"], indices_per_noise: int = DEMO_DEFAULTS["indices_per_noise"],
             norm: str = DEMO_DEFAULTS["norm"],
             huber_c: Optional[float] = DEMO_DEFAULTS["huber_c"], ema_rates=tuple(DEMO_DEFAULTS["ema_rates"]),
             weights: str = DEMO_DEFAULTS["weights"], teacher_share: float = DEMO_DEFAULTS["teacher_share"],
             chunk: int = DEMO_DEFAULTS["chunk"],
             num_samples: int = DEMO_DEFAULTS["num_samples"], max_minutes: Optional[float] = DEMO_DEFAULTS["max_minutes"],
             seed: int = 0, teacher_path: Optional[str] = None, features_path: Optional[str] = None,
             analytic: bool = True, resume: bool = False, overwrite: bool = False, threads: Optional[int] = None,
             progress: bool = True,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the demo; returns a summary dict (also written to ``out_dir/summary.json``).

    max_minutes: wall-clock budget of the distillation (None: no limit); when a chunk ends past
    it, distillation stops there. resume: continue the run in ``out_dir/run`` (e.g. with more
    ``steps``). overwrite: start afresh, deleting a previous run in ``out_dir/run`` (only that
    folder; the pictures and summary.json are rewritten anyway). threads: torch CPU threads
    (None: the faster of 1 and all cores, timed on the teacher's network at start-up; see
    ``pick_threads``).
    """
    for name, value in (("steps", steps), ("batch_size", batch_size), ("chunk", chunk),
                        ("num_samples", num_samples)):
        check_int(value, name)
    check_int(N, "N", 2)
    check_int(indices_per_noise, "indices_per_noise")
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (an FD needs a covariance), got {num_samples}")
    check_positive(max_minutes, "max_minutes", allow_none=True)
    check_int(threads, "threads", allow_none=True)
    if isinstance(teacher_share, bool) or not isinstance(teacher_share, (int, float)) or not 0 <= teacher_share < 1:
        raise ValueError(f"teacher_share must be a number in [0, 1), got {teacher_share!r}")
    teacher_path = os.fspath(teacher_path or DEFAULT_TEACHER)
    config = demo_config(teacher_path, steps=steps, batch_size=batch_size, lr=lr, N=N, norm=norm, huber_c=huber_c,
                         ema_rates=ema_rates, chunk=chunk, seed=seed, progress=progress,
                         indices_per_noise=indices_per_noise)
    run = DemoRun(out_dir=os.fspath(out_dir), teacher_path=teacher_path,
                  features_path=os.fspath(features_path or DEFAULT_FEATURES),
                  config=resolve_config(config),  # bad options fail here, before any work
                  steps=steps, batch_size=batch_size, N=N, indices_per_noise=indices_per_noise, norm=norm, lr=lr, ema_rates=tuple(ema_rates),
                  weights=weights, teacher_share=float(teacher_share), chunk=chunk, num_samples=num_samples,
                  max_minutes=max_minutes, seed=seed,
                  resume=resume, progress=progress, log=log)
    pick_weights(weights, ema_rates, steps)  # validates
    _prepare_folders(run, overwrite)
    run.t_start = time.perf_counter()
    with _cpu_settings():
        teacher = load_digits_teacher(run.teacher_path)
        scorer = DigitsScorer(run.features_path)
        _use_threads(threads, teacher, run)
        rows, samples = baselines(run, teacher, scorer)
        distillation = distill(run, scorer)
        rows["student"], samples["student"], chosen, final_step = score(run, scorer)
        analytic_rows = _analytic_sweep(run) if analytic else None
        return report(run, rows, samples, distillation, chosen=chosen, final_step=final_step,
                      analytic_rows=analytic_rows)


def _prepare_folders(run: DemoRun, overwrite: bool) -> None:
    """Create out_dir; refuse a previous run in run_dir unless resumed, or delete it with overwrite."""
    if run.resume and overwrite:
        raise ValueError("resume and overwrite exclude each other (continue the run, or replace it)")
    run_dir = run.run_dir
    if os.path.isdir(run_dir) and list_checkpoints(run_dir) and not run.resume:
        if not overwrite:
            raise FileExistsError(f"out_dir: {run_dir!r} already holds a run; pass resume=True (--resume) to "
                                  f"continue it, overwrite=True (--overwrite) to replace it, or choose another out_dir")
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise FileExistsError(f"out_dir: {run_dir!r} does not look like a pid-fast run (no config.json); "
                                  f"not deleting it")
        shutil.rmtree(run_dir)
    os.makedirs(run.out_dir, exist_ok=True)


@contextlib.contextmanager
def _cpu_settings() -> Iterator[None]:
    """Flush denormals (they slow CPUs down ~10x) and restore torch's thread count afterwards."""
    threads_before = torch.get_num_threads()
    denormals = torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if denormals:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)


def _image_shape(teacher: torch.nn.Module) -> tuple[int, int, int]:
    resolution = int(teacher.model.img_resolution)
    return int(teacher.model.in_channels), resolution, resolution


def _use_threads(threads: Optional[int], teacher: torch.nn.Module, run: DemoRun) -> None:
    """Set torch's CPU threads by the trainer's rule (pid_fast.train.threads.choose_threads:
    ``threads``, else a resumed run's, else OMP_NUM_THREADS, else timed) and log the run's set-up."""
    shape = _image_shape(teacher)
    recorded = recorded_threads(run.run_dir) if run.resume and os.path.isdir(run.run_dir) else None
    threads, why = choose_threads(threads, recorded, os.environ,
                                  lambda: pick_threads(teacher.model, (run.batch_size, *shape)))
    run.log(f"CPU threads: {threads} ({why})")
    torch.set_num_threads(threads)
    run.log(f"pid-fast demo: teacher {run.teacher_path}\n  {sum(p.numel() for p in teacher.parameters()):,} "
            f"parameters, {shape[1]}x{shape[2]} digits; FD = Frechet distance of digits-classifier features "
            f"({run.features_path}) to the 1797 real digits, {run.num_samples} samples each; "
            f"{torch.get_num_threads()} CPU thread(s)")


def baselines(run: DemoRun, teacher: torch.nn.Module, scorer: DigitsScorer) -> tuple[dict, dict]:
    """The rows a student is compared with, keyed 'real', 'heun', 'euler' (label, nfe, fd_teacher,
    rmse_to_heun (not for 'real'), fd, kid, seconds), and the teacher's samples from the run's
    seeds, keyed 'heun', 'euler'. Sets ``scorer``'s teacher samples (the Heun ones)."""
    shape = _image_shape(teacher)
    z, _ = seeded_latents(run.seeds, shape)
    run.log("teacher baselines (Heun 18 steps = 35 evaluations; Euler 1 step) ...")
    samples: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}
    for key, sampler, num_steps in (("heun", heun_sample, 18), ("euler", euler_sample, 1)):
        t0 = time.perf_counter()
        with torch.no_grad():
            samples[key] = sampler(teacher, z, num_steps=num_steps).float().clamp(-1, 1)
        seconds[key] = time.perf_counter() - t0
    scorer.use_teacher(samples["heun"])
    # Real images: what an ideal generator would score at this sample size (a subset of the
    # reference set, so slightly optimistic); their FD to the teacher's samples is the teacher's
    # own distance to the data, seen from the other side.
    real, _ = load_digits(shape[1])
    perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(run.seed))
    perm = perm[:min(run.num_samples, real.shape[0])]
    rows: dict[str, dict[str, Any]] = {
        "real": {"label": f"real digits ({perm.numel()} of the reference set)", "nfe": 0,
                 **scorer(real[perm], same_noise=False), "seconds": 0.0},
        "heun": {"label": "teacher, Heun 18 steps", "nfe": 35, **scorer(samples["heun"]), "seconds": seconds["heun"]},
        "euler": {"label": "teacher, Euler 1 step", "nfe": 1, **scorer(samples["euler"]),
                  "seconds": seconds["euler"]}}
    run.log(f"  Heun FD to data {rows['heun']['fd']:.3f} ({rows['heun']['seconds']:.0f}s); Euler FD to the Heun "
            f"samples {rows['euler']['fd_teacher']:.3f}, RMSE to Heun {rows['euler']['rmse_to_heun']:.4f}")
    return rows, samples


@dataclasses.dataclass
class Distillation:
    """What ``distill`` leaves: the one-step FD to the data and to the teacher's Heun samples of
    each weights ('model', 'ema-<rate>') at each checkpoint step, the checkpoint steps in order,
    the distillation's time (scoring excluded), and whether the time budget stopped it."""
    fd_by_step: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    fd_teacher_by_step: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)
    steps: list[int] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    stopped_early: bool = False

    def curves(self, weights: list[str], to_teacher: bool = False) -> dict[str, list[float]]:
        """FD to the data (to the teacher's samples: ``to_teacher``) over training of each of
        ``weights``, aligned with ``steps``."""
        by_step = self.fd_teacher_by_step if to_teacher else self.fd_by_step
        return {w: [by_step[step][w] for step in self.steps] for w in weights}


def _recipe_extras(config: dict) -> str:
    """The grid weighting and per-group lr of a demo config, when not the plain ones (for the log)."""
    grid, scales = config["grid"], config["optimizer"].get("lr_scale") or {}
    extras = []
    if grid.get("weighting", "uniform") != "uniform":
        power = f" ^ {grid['weighting_power']:g}" if grid["weighting"] == "endpoint" else ""
        extras.append(f"{grid['weighting']} grid weights{power}")
    if scales:
        extras.append("lr " + ", ".join(f"x{v:g} for {k}" for k, v in scales.items()))
    return "".join(f", {e}" for e in extras)


def distill(run: DemoRun, scorer: DigitsScorer) -> Distillation:
    """PID distillation in chunks of ``run.chunk`` steps (the trainer's resume is exact, so
    chunking does not change the result), scoring each new checkpoint; stops at the first chunk
    that ends past ``run.max_minutes`` of distillation."""
    points = f" x {run.indices_per_noise} grid points per noise" if run.indices_per_noise > 1 else ""
    run.log(f"PID distillation: {run.steps} steps of batch {run.batch_size}{points}, N={run.N}, {run.norm} norm, RAdam "
            f"lr {run.lr}{_recipe_extras(run.config)}, budget {'none' if run.max_minutes is None else f'{run.max_minutes:g} min'} -> "
            f"{run.run_dir}")
    result = Distillation()
    t_distill = time.perf_counter()
    done = max([s for s, _ in list_checkpoints(run.run_dir)], default=0) if run.resume else 0
    while done < run.steps:
        done = min(run.steps, (done // run.chunk + 1) * run.chunk)
        train(dict(run.config, total_steps=done), run.run_dir, resume=True)
        t_score = time.perf_counter()
        _score_checkpoints(run, scorer, result)
        t_distill += time.perf_counter() - t_score  # the budget counts distillation only
        elapsed = (time.perf_counter() - t_distill) / 60
        if run.max_minutes is not None and elapsed > run.max_minutes and done < run.steps:
            result.stopped_early = True
            run.log(f"  time budget of {run.max_minutes:g} min used up at step {done}/{run.steps}: stopping here "
                    f"(continue with --resume --steps ... --max-minutes ...)")
            break
    result.seconds = time.perf_counter() - t_distill
    _score_checkpoints(run, scorer, result)
    result.steps = sorted(step for step, _ in list_checkpoints(run.run_dir))
    return result


def _score_checkpoints(run: DemoRun, scorer: DigitsScorer, result: Distillation) -> None:
    """One-step FD to the teacher's samples and to the data of the raw weights and of each EMA at
    every checkpoint not yet scored."""
    for step, path in sorted(list_checkpoints(run.run_dir)):
        if step in result.fd_by_step:
            continue
        result.fd_by_step[step], result.fd_teacher_by_step[step] = {}, {}
        for w in run.all_weights:
            net, meta = _load_weights(run, path, w)
            x, _ = generate(net, meta, run.seeds, batch=500)
            scores = scorer.curves(x)
            result.fd_by_step[step][w], result.fd_teacher_by_step[step][w] = scores["fd"], scores["fd_teacher"]
        run.log(f"  step {step}: one-step FD to teacher / to data " + ", ".join(
            f"{w} {result.fd_teacher_by_step[step][w]:.3f} / {v:.3f}" for w, v in result.fd_by_step[step].items())
            + f"  ({run.seconds() / 60:.1f} min)")


def _load_weights(run: DemoRun, path: str, weights: str, teacher_share: float = 0.0):
    """(student, metadata) of 'model', 'ema-<rate>' or 'model+teacher-<share>' at a checkpoint,
    blended as (1 - share) weights + share x the initial (teacher's) weights when share > 0."""
    if "+teacher-" in weights:
        weights, teacher_share = weights.split("+teacher-")[0], float(weights.split("+teacher-")[1])
    net, meta = load_student(path, weights=weights)
    if teacher_share:
        initial = load_digits_teacher(run.teacher_path).model.state_dict()
        net.load_state_dict(blend_with_initial(net.state_dict(), initial, teacher_share))
    return net, meta


def score(run: DemoRun, scorer: DigitsScorer) -> tuple[dict, torch.Tensor, str, int]:
    """The student's row (one step from the run's seeds, with the weights ``run.weights`` picks at
    the final checkpoint), its samples, the weights' name and the final step."""
    final_step, final_path = max(list_checkpoints(run.run_dir))
    chosen = pick_weights(run.weights, run.ema_rates, final_step)
    net, meta = _load_weights(run, final_path, chosen, run.teacher_share)
    t0 = time.perf_counter()
    x_student, _ = generate(net, meta, run.seeds, batch=500)
    seconds = time.perf_counter() - t0
    share = f", {100 * run.teacher_share:g}% teacher weights" if run.teacher_share else ""
    row = {"label": f"PID student, 1 step ({chosen}{share})", "nfe": 1, **scorer(x_student), "seconds": seconds}
    return row, x_student, chosen, final_step


def _analytic_sweep(run: DemoRun) -> list[dict[str, Any]]:
    """The analytic Gaussian-mixture teacher's one-step student error against N."""
    run.log("analytic teacher (Gaussian mixture in 2-D): one-step student error vs N ...")
    t0 = time.perf_counter()
    rows = analytic_sweep.sweep_n((2, 4, 8, 16, 64), num_eval=1000, steps=1500, batch_size=128, seed=run.seed,
                                  progress=run.progress)
    run.log(f"  done in {time.perf_counter() - t0:.0f}s")
    return rows


def report(run: DemoRun, rows: dict, samples: dict, distillation: Distillation, *, chosen: str, final_step: int,
           analytic_rows: Optional[list] = None) -> dict[str, Any]:
    """Draw the pictures, write ``summary.json``, log the table; returns the summary."""
    curves = distillation.curves(run.all_weights)
    teacher_curves = distillation.curves(run.all_weights, to_teacher=True)
    grid_n = min(32, run.num_samples)
    pictures = {
        "samples": save_comparison_grid(
            {"PID student, 1 step": samples["student"][:grid_n], "teacher, Heun 35 NFE": samples["heun"][:grid_n],
             "teacher, Euler 1 step": samples["euler"][:grid_n]}, os.path.join(run.out_dir, "student_vs_teacher.png"),
            title="The same noise at the same place in each panel"),
        "loss": plot_loss_curve(os.path.join(run.run_dir, "log.jsonl"), os.path.join(run.out_dir, "loss.png"),
                                title=f"PID loss ({run.norm}, N={run.N}, batch {run.batch_size})"),
        "fd_over_training": plot_fd_over_training(
            distillation.steps, {f"student ({w})": v for w, v in curves.items()},
            os.path.join(run.out_dir, "fd_over_training.png"),
            references={"teacher Heun 35 NFE": rows["heun"]["fd"], "real digits": rows["real"]["fd"]}),
        "fd_teacher_over_training": plot_fd_over_training(
            distillation.steps, {f"student ({w})": v for w, v in teacher_curves.items()},
            os.path.join(run.out_dir, "fd_teacher_over_training.png"),
            references={"teacher Euler 1 step": rows["euler"]["fd_teacher"]},
            ylabel="FD to the teacher's Heun samples",
            title="One-step FD to the teacher's samples from the same noise"),
    }
    if analytic_rows is not None:
        pictures["fd_vs_n"] = plot_fd_vs_n(analytic_rows, os.path.join(run.out_dir, "fd_vs_n.png"))
    summary = {
        "rows": rows, "ratio": rows["student"]["fd"] / rows["heun"]["fd"], "target_ratio": 1.5,
        "steps": final_step, "requested_steps": run.steps, "stopped_early": distillation.stopped_early,
        "batch_size": run.batch_size, "distill_seconds": distillation.seconds, "total_seconds": run.seconds(),
        "fd_over_training": {"steps": distillation.steps, **curves},
        "fd_teacher_over_training": {"steps": distillation.steps, **teacher_curves},
        "analytic": analytic_rows, "pictures": pictures,
        "run_dir": run.run_dir, "config": run.config, "weights": chosen, "teacher_share": run.teacher_share,
        "threads": torch.get_num_threads(),
        "num_samples": run.num_samples,
    }
    with open(os.path.join(run.out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    run.log(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The demo's result table (plain text)."""
    rows = summary["rows"]
    width = max(40, *(len(rows[key]["label"]) for key in ("student", "heun", "euler", "real")))
    lines = [f"{'':{width}s} {'NFE':>4s} {'FD to teacher':>13s} {'RMSE to Heun':>13s} {'FD to data':>10s} "
             f"{'KID':>8s} {'time':>7s}"]
    for key in ("student", "heun", "euler", "real"):
        r = rows[key]
        t = f"{r['seconds']:.1f}s" if key != "real" else "-"
        ft = f"{max(r['fd_teacher'], 0.0):.3f}" if "fd_teacher" in r else "-"  # (-1e-9 for the teacher itself)
        d = f"{r['rmse_to_heun']:.4f}" if "rmse_to_heun" in r else "-"
        lines.append(f"{r['label']:{width}s} {r['nfe']:>4d} {ft:>13s} {d:>13s} {r['fd']:>10.3f} {r['kid']:>8.4f} "
                     f"{t:>7s}")
    lines.append("(FD to teacher: digits-classifier features of the samples vs the teacher's Heun samples from the "
                 "same noise, 0 = the teacher's distribution; RMSE to Heun: per pixel, same noise, images in "
                 "[-1, 1]; FD to data, KID: vs the 1797 real digits)")
    student = rows["student"]
    if "fd_teacher" in student:
        lines.append(f"student's distance to the teacher: FD {student['fd_teacher']:.3f}, RMSE to Heun "
                     f"{student['rmse_to_heun']:.4f}")
    ratio = summary["ratio"]
    lines.append(f"student FD to data / teacher Heun FD to data = {ratio:.2f} (target <= {summary['target_ratio']:g})")
    points = summary["config"]["grid"].get("indices_per_noise", 1)
    lines.append(f"distillation: {summary['steps']} steps x batch {summary['batch_size']}"
                 + (f" x {points} grid points per noise" if points > 1 else "")
                 + _recipe_extras(summary["config"]) + " in "
                 f"{summary['distill_seconds'] / 60:.1f} min"
                 + (" (stopped by the time budget)" if summary["stopped_early"] else "")
                 + f"; total wall time {summary['total_seconds'] / 60:.1f} min on {summary['threads']} thread(s)")
    if summary.get("analytic"):
        a = summary["analytic"]
        lines.append("analytic teacher, endpoint RMSE of the one-step student vs exact: "
                     + ", ".join(f"N={r['N']}: {r['rmse']:.3f}" for r in a))
    lines.append("pictures:")
    for name, path in summary["pictures"].items():
        lines.append(f"  {name:24s} {path}")
    lines.append(f"  {'run folder':24s} {summary['run_dir']} (checkpoints, log.jsonl, samples-*.png)")
    return "\n".join(lines)
