"""`pid-fast demo`: PID end to end on the CPU, offline, in about ten minutes.

1. Load the bundled digits teacher (a small EDM SongUNet, ``pid_fast.demo.digits``) and the bundled
   digits feature network (``pid_fast.eval.metrics.DigitsFeatures``).
2. The teacher's baselines on fixed seeds: EDM's Heun sampler with 18 steps (35 network
   evaluations) and a single Euler step; their digits FD / KID against the 1797 real digits.
3. PID-distil a one-step student from the teacher with ``pid_fast.train.trainer.train`` (the same
   trainer as ``pid-fast distill``), in chunks; after each chunk the student's one-step FD is
   measured, so the run also yields an FD-over-training curve, and a time budget can stop it
   early on a slow machine (at a chunk boundary; the run can be continued with ``--resume``).
4. The student's one-step samples from the same seeds, a table, and pictures: a grid of
   student vs teacher from the same noise, the loss curve, FD over training, and (optional) the
   analytic Gaussian-mixture teacher's error against N.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import torch

from pid_fast.eval.checkpoints import pick_weights
from pid_fast.train.threads import pick_threads

__all__ = ["DEMO_DEFAULTS", "demo_config", "pick_weights", "run_demo", "format_table"]

# The recipe of the demo's distillation. The student starts as a copy of the teacher (PID);
# pseudo-Huber instead of LPIPS (no downloads); a learning rate 10x the reference's 2e-4
# (batch 512, 800k steps) because the budget is 1200 steps of batch 64, and EMAs short enough
# for that budget: the raw weights are noisy at this learning rate and the EMA at 0.998
# (half-life ~350 steps) scores far better than they do (see the FD-over-training plot).
DEMO_DEFAULTS: dict[str, Any] = {
    "steps": 1200,
    "batch_size": 64,
    "lr": 2e-3,
    "N": 250,
    "norm": "huber",
    "huber_c": 0.01,
    "ema_rates": [0.995, 0.998],
    "weights": "auto",
    "chunk": 200,
    "num_samples": 1000,
    "max_minutes": 7.0,
}


def demo_config(teacher_path: str, *, steps: int, batch_size: int, lr: float, N: int, norm: str,
                huber_c: Optional[float], ema_rates, chunk: int, seed: int = 0, progress: bool = True) -> dict:
    """The ``pid_fast.train.trainer`` config of the demo's distillation."""
    return {
        "seed": seed, "device": "cpu",
        "teacher": {"kind": "edm", "path": os.fspath(teacher_path)},
        "student": {"init": "teacher", "network": None, "dropout": 0.0, "seed": 1},
        "loss": {"N": N, "norm": norm, "huber_c": huber_c if norm == "huber" else None},
        "optimizer": {"name": "radam", "lr": lr},
        "ema_rates": list(ema_rates),
        "batch_size": batch_size,
        "total_steps": steps,
        "log_every": max(1, min(50, chunk)),
        "checkpoint_every": chunk,
        "keep_checkpoints": 0,
        "snapshot_every": chunk,
        "snapshot_num": 64,
        "progress": progress,
    }


def _float_or_none(text: str) -> Optional[float]:
    try:
        return float(text)
    except ValueError:
        return None


def _check_int(v: Any, name: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {v!r}")
    return v


def run_demo(out_dir: str | os.PathLike = "pid-demo", *, steps: int = DEMO_DEFAULTS["steps"],
             batch_size: int = DEMO_DEFAULTS["batch_size"], lr: float = DEMO_DEFAULTS["lr"],
             N: int = DEMO_DEFAULTS["N"], norm: str = DEMO_DEFAULTS["norm"],
             huber_c: Optional[float] = DEMO_DEFAULTS["huber_c"], ema_rates=tuple(DEMO_DEFAULTS["ema_rates"]),
             weights: str = DEMO_DEFAULTS["weights"], chunk: int = DEMO_DEFAULTS["chunk"],
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
    from pid_fast.demo.digits import DEFAULT_FEATURES, DEFAULT_TEACHER, load_digits_teacher
    from pid_fast.eval.metrics import DigitsFeatures, digits_reference_features, fd_from_features, kernel_distance
    from pid_fast.eval.plots import plot_fd_over_training, plot_fd_vs_n, plot_loss_curve, save_comparison_grid
    from pid_fast.sampling import euler_sample, heun_sample, seeded_latents
    from pid_fast.train.trainer import generate, list_checkpoints, load_student, resolve_config, train

    for name, v in (("steps", steps), ("batch_size", batch_size), ("chunk", chunk), ("num_samples", num_samples)):
        _check_int(v, name)
    _check_int(N, "N", 2)
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (an FD needs a covariance), got {num_samples}")
    if max_minutes is not None and not (isinstance(max_minutes, (int, float)) and max_minutes > 0):
        raise ValueError(f"max_minutes must be a positive number or None, got {max_minutes!r}")
    if threads is not None:
        _check_int(threads, "threads")
    teacher_path = os.fspath(teacher_path or DEFAULT_TEACHER)
    features_path = os.fspath(features_path or DEFAULT_FEATURES)
    out_dir = os.fspath(out_dir)
    run_dir = os.path.join(out_dir, "run")
    config = demo_config(teacher_path, steps=steps, batch_size=batch_size, lr=lr, N=N, norm=norm, huber_c=huber_c,
                         ema_rates=ema_rates, chunk=chunk, seed=seed, progress=progress)
    config = resolve_config(config)  # bad options fail here, before any work
    pick_weights(weights, ema_rates, steps)  # validates
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other (continue the run, or replace it)")
    if os.path.isdir(run_dir) and list_checkpoints(run_dir) and not resume:
        if not overwrite:
            raise FileExistsError(f"out_dir: {run_dir!r} already holds a run; pass resume=True (--resume) to "
                                  f"continue it, overwrite=True (--overwrite) to replace it, or choose another out_dir")
        if not os.path.isfile(os.path.join(run_dir, "config.json")):
            raise FileExistsError(f"out_dir: {run_dir!r} does not look like a pid-fast run (no config.json); "
                                  f"not deleting it")
        shutil.rmtree(run_dir)
    os.makedirs(out_dir, exist_ok=True)
    t_start = time.perf_counter()
    threads_before = torch.get_num_threads()
    denormals = torch.set_flush_denormal(True)  # denormals slow CPUs down ~10x
    try:
        teacher = load_digits_teacher(teacher_path)
        features = DigitsFeatures(features_path)
        shape = (int(teacher.model.in_channels), int(teacher.model.img_resolution), int(teacher.model.img_resolution))
        if threads is None:
            threads, timings = pick_threads(teacher.model, (batch_size, *shape))
            log(f"CPU threads: {threads} (one training-sized forward+backward: "
                + ", ".join(f"{n} thread(s) {t * 1e3:.0f} ms" for n, t in timings.items()) + ")")
        torch.set_num_threads(threads)
        ref = digits_reference_features(features)
        seeds = list(range(num_samples))
        z, _ = seeded_latents(seeds, shape)
        log(f"pid-fast demo: teacher {teacher_path}\n  {sum(p.numel() for p in teacher.parameters()):,} parameters, "
            f"{shape[1]}x{shape[2]} digits; FD = Frechet distance of digits-classifier features "
            f"({features_path}) to the 1797 real digits, {num_samples} samples each; {torch.get_num_threads()} "
            f"CPU thread(s)")

        def measure(x: torch.Tensor) -> dict[str, float]:
            f = features.features(x)
            return {"fd": fd_from_features(f, ref), "kid": kernel_distance(f, ref)}

        rows: dict[str, dict[str, Any]] = {}
        # Real images: what an ideal generator would score at this sample size (a subset of the
        # reference set, so slightly optimistic).
        from pid_fast.demo.digits import load_digits

        real, _ = load_digits(shape[1])
        perm = torch.randperm(real.shape[0], generator=torch.Generator().manual_seed(seed))[:min(num_samples, real.shape[0])]
        rows["real"] = {"label": f"real digits ({perm.numel()} of the reference set)", "nfe": 0,
                        **measure(real[perm]), "seconds": 0.0}

        log("teacher baselines (Heun 18 steps = 35 evaluations; Euler 1 step) ...")
        t0 = time.perf_counter()
        with torch.no_grad():
            x_heun = heun_sample(teacher, z, num_steps=18).float().clamp(-1, 1)
        rows["heun"] = {"label": "teacher, Heun 18 steps", "nfe": 35, **measure(x_heun),
                        "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        with torch.no_grad():
            x_euler = euler_sample(teacher, z, num_steps=1).float().clamp(-1, 1)
        rows["euler"] = {"label": "teacher, Euler 1 step", "nfe": 1, **measure(x_euler),
                         "seconds": time.perf_counter() - t0}

        def rmse_to_heun(x: torch.Tensor) -> float:
            # Per-pixel RMS distance to the teacher's Heun sample from the same noise: how well
            # a one-step sampler reproduces the teacher's ODE solution, not just its distribution.
            return float((x - x_heun).square().mean().sqrt())

        rows["heun"]["rmse_to_heun"] = 0.0
        rows["euler"]["rmse_to_heun"] = rmse_to_heun(x_euler)
        log(f"  Heun FD {rows['heun']['fd']:.3f} ({rows['heun']['seconds']:.0f}s), "
            f"Euler FD {rows['euler']['fd']:.3f}")

        # Distillation in chunks (the trainer's resume is exact, so chunking does not change
        # the result), with the student's FD after every chunk.
        log(f"PID distillation: {steps} steps of batch {batch_size}, N={N}, {norm} norm, RAdam lr {lr}, "
            f"budget {'none' if max_minutes is None else f'{max_minutes:g} min'} -> {run_dir}")
        all_weights = ["model"] + [f"ema-{float(r)}" for r in ema_rates]
        curve: dict[int, dict[str, float]] = {}

        def score_checkpoints() -> None:
            # One-step FD of the raw weights and of each EMA at every checkpoint not yet scored.
            for step, path in sorted(list_checkpoints(run_dir)):
                if step in curve:
                    continue
                curve[step] = {}
                for w in all_weights:
                    net, meta = load_student(path, weights=w)
                    x, _ = generate(net, meta, seeds, batch=500)
                    curve[step][w] = measure(x)["fd"]
                log(f"  step {step}: one-step FD " + ", ".join(f"{w} {v:.3f}" for w, v in curve[step].items())
                    + f"  ({(time.perf_counter() - t_start) / 60:.1f} min)")

        t_distill = time.perf_counter()
        done = max([s for s, _ in list_checkpoints(run_dir)], default=0) if resume else 0
        stopped_early = False
        while done < steps:
            target = min(steps, (done // chunk + 1) * chunk)
            train(dict(config, total_steps=target), run_dir, resume=True)
            done = target
            t_score = time.perf_counter()
            score_checkpoints()
            t_distill += time.perf_counter() - t_score  # the budget counts distillation only
            elapsed = (time.perf_counter() - t_distill) / 60
            if max_minutes is not None and elapsed > max_minutes and done < steps:
                stopped_early = True
                log(f"  time budget of {max_minutes:g} min used up at step {done}/{steps}: stopping here "
                    f"(continue with --resume --steps ... --max-minutes ...)")
                break
        distill_seconds = time.perf_counter() - t_distill
        score_checkpoints()
        ckpts = sorted(list_checkpoints(run_dir))
        curve_steps = [step for step, _ in ckpts]
        curve_by_weights = {w: [curve[step][w] for step in curve_steps] for w in all_weights}
        final_step, final_path = ckpts[-1]
        chosen = pick_weights(weights, ema_rates, final_step)
        net, meta = load_student(final_path, weights=chosen)
        t0 = time.perf_counter()
        x_student, _ = generate(net, meta, seeds, batch=500)
        student_seconds = time.perf_counter() - t0
        rows["student"] = {"label": f"PID student, 1 step ({chosen})", "nfe": 1, **measure(x_student),
                           "seconds": student_seconds, "rmse_to_heun": rmse_to_heun(x_student)}

        # Pictures.
        grid_n = min(32, num_samples)
        pictures = {
            "samples": save_comparison_grid(
                {"PID student, 1 step": x_student[:grid_n], "teacher, Heun 35 NFE": x_heun[:grid_n],
                 "teacher, Euler 1 step": x_euler[:grid_n]}, os.path.join(out_dir, "student_vs_teacher.png"),
                title="The same noise at the same place in each panel"),
            "loss": plot_loss_curve(os.path.join(run_dir, "log.jsonl"), os.path.join(out_dir, "loss.png"),
                                    title=f"PID loss ({norm}, N={N}, batch {batch_size})"),
            "fd_over_training": plot_fd_over_training(
                curve_steps, {f"student ({w})": v for w, v in curve_by_weights.items()},
                os.path.join(out_dir, "fd_over_training.png"),
                references={"teacher Heun 35 NFE": rows["heun"]["fd"], "real digits": rows["real"]["fd"]}),
        }
        analytic_rows = None
        if analytic:
            from pid_fast.models.analytic import sweep_n

            log("analytic teacher (Gaussian mixture in 2-D): one-step student error vs N ...")
            t0 = time.perf_counter()
            analytic_rows = sweep_n((2, 4, 8, 16, 64), num_eval=1000, steps=1500, batch_size=128, seed=seed,
                                    progress=progress)
            pictures["fd_vs_n"] = plot_fd_vs_n(analytic_rows, os.path.join(out_dir, "fd_vs_n.png"))
            log(f"  done in {time.perf_counter() - t0:.0f}s")
        used_threads = torch.get_num_threads()
    finally:
        if denormals:
            torch.set_flush_denormal(False)
        torch.set_num_threads(threads_before)

    summary = {
        "rows": rows, "ratio": rows["student"]["fd"] / rows["heun"]["fd"], "target_ratio": 1.5,
        "steps": final_step, "requested_steps": steps, "stopped_early": stopped_early, "batch_size": batch_size,
        "distill_seconds": distill_seconds, "total_seconds": time.perf_counter() - t_start,
        "fd_over_training": {"steps": curve_steps, **curve_by_weights}, "analytic": analytic_rows, "pictures": pictures,
        "run_dir": run_dir, "config": config, "weights": chosen, "threads": used_threads,
        "num_samples": num_samples,
    }
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=float)
    log(format_table(summary))
    return summary


def format_table(summary: dict[str, Any]) -> str:
    """The demo's result table (plain text)."""
    rows = summary["rows"]
    lines = [f"{'':40s} {'NFE':>4s} {'FD':>8s} {'KID':>8s} {'RMSE to Heun':>13s} {'time':>7s}"]
    for key in ("student", "heun", "euler", "real"):
        r = rows[key]
        t = f"{r['seconds']:.1f}s" if key != "real" else "-"
        d = f"{r['rmse_to_heun']:.4f}" if "rmse_to_heun" in r else "-"
        lines.append(f"{r['label']:40s} {r['nfe']:>4d} {r['fd']:>8.3f} {r['kid']:>8.4f} {d:>13s} {t:>7s}")
    lines.append("(FD, KID: digits-classifier features vs the 1797 real digits; RMSE to Heun: per pixel, "
                 "same noise, images in [-1, 1])")
    ratio = summary["ratio"]
    lines.append(f"student FD / teacher Heun FD = {ratio:.2f} (target <= {summary['target_ratio']:g})")
    lines.append(f"distillation: {summary['steps']} steps x batch {summary['batch_size']} in "
                 f"{summary['distill_seconds'] / 60:.1f} min"
                 + (" (stopped by the time budget)" if summary["stopped_early"] else "")
                 + f"; total wall time {summary['total_seconds'] / 60:.1f} min on {summary['threads']} thread(s)")
    if summary.get("analytic"):
        a = summary["analytic"]
        lines.append("analytic teacher, endpoint RMSE of the one-step student vs exact: "
                     + ", ".join(f"N={r['N']}: {r['rmse']:.3f}" for r in a))
    lines.append("pictures:")
    for name, path in summary["pictures"].items():
        lines.append(f"  {name:17s} {path}")
    lines.append(f"  run folder        {summary['run_dir']} (checkpoints, log.jsonl, samples-*.png)")
    return "\n".join(lines)
