"""`pid-fast demo --guidance W`: PID of a guided teacher, offline, on the CPU.

The class-conditional digits teacher (trained with label dropout, so that it guides itself:
classifier-free guidance, ``pid_fast.guided``) is distilled twice with the demo's recipe: at
w = 1 (the conditional teacher) and at w = W. Each student is scored against its own teacher's
18-step Heun samples from the same noise and labels, first by the distance to them (FD between
the two sample sets and the per-pixel RMSE), then by the FD to the real digits and the digits
classifier's accuracy on the samples of each class (guidance should raise it over w = 1).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, Callable, Optional

import torch

from pid_fast.checks import check_int
from pid_fast.eval.digits import load_classifier
from pid_fast.demo.files import DEFAULT_CONDITIONAL_TEACHER, DEFAULT_FEATURES
from pid_fast.demo.settings import DEMO_DEFAULTS, demo_config
from pid_fast.demo.teacher import NUM_CLASSES, load_digits_teacher
from pid_fast.eval.metrics import DigitsFeatures, digits_reference_features, fd_from_features
from pid_fast.models.guidance import guided
from pid_fast.sampling import heun_sample, seeded_latents
from pid_fast.train import generate, list_checkpoints, load_student, train
from pid_fast.train.threads import choose_threads, pick_threads

__all__ = ["run_guided_demo", "guided_scores", "format_guided_table"]


def guided_scores(images: torch.Tensor, labels: torch.Tensor, reference: torch.Tensor, features: DigitsFeatures,
                  classifier: torch.nn.Module) -> dict[str, float]:
    """The scores of ``images`` drawn for integer class ``labels`` against ``reference`` (the
    guided teacher's Heun samples from the same noise and labels): FD between the two sets of
    classifier features and the per-pixel RMSE (the distance to the teacher), the FD to the real
    digits, and the classifier's accuracy averaged over the classes."""
    feats, ref = features.features(images), features.features(reference)
    with torch.no_grad():
        predicted = torch.cat([classifier(x).argmax(1) for x in images.split(500)])
    per_class = [float((predicted[labels == c] == c).float().mean()) for c in range(NUM_CLASSES) if (labels == c).any()]
    return {"fd_to_teacher": fd_from_features(feats, ref),
            "rmse_to_heun": float((images - reference).square().mean().sqrt()),
            "fd": fd_from_features(feats, digits_reference_features(features)),
            "accuracy": sum(per_class) / len(per_class)}


# Two distillations (w = 1 and w = W) with a guided teacher at twice the cost per call: the guided
# demo runs the plain demo's recipe (DEMO_DEFAULTS) for 400 steps each instead of DEMO_DEFAULTS["steps"]
# (benchmarks/results/guided_demo.md).
GUIDED_STEPS = 400


def run_guided_demo(out_dir: str | os.PathLike = "pid-demo-guided", *, scale: float = 2.0,
                    teacher_path: Optional[str | os.PathLike] = None,
                    features_path: Optional[str | os.PathLike] = None, steps: int = GUIDED_STEPS,
                    batch_size: int = DEMO_DEFAULTS["batch_size"], lr: float = DEMO_DEFAULTS["lr"],
                    N: int = DEMO_DEFAULTS["N"], num_samples: int = 1000, seed: int = 0, progress: bool = True,
                    threads: Optional[int] = None, overwrite: bool = False,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Distil the class-conditional digits teacher at w = 1 and at w = ``scale`` (classifier-free
    guidance with the zero label as the unconditional input) and score both students against
    their guided teacher's Heun samples (``guided_scores``). Writes ``summary.json`` in
    ``out_dir`` and returns it; the table is logged. The runs (``out_dir``/run-w<w>) are resumed
    when present (``overwrite``: started afresh). threads: torch CPU threads (None: the
    trainer's rule, pid_fast.train.threads)."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
        raise ValueError(f"scale must be a positive number (the guidance weight w), got {scale!r}")
    check_int(threads, "threads", allow_none=True)
    teacher_path = os.fspath(teacher_path or DEFAULT_CONDITIONAL_TEACHER)
    teacher = load_digits_teacher(teacher_path)
    if int(teacher.label_dim) != NUM_CLASSES:
        raise ValueError(f"teacher_path: {teacher_path!r} is not a class-conditional digits teacher (label_dim "
                         f"{teacher.label_dim}); make one with pid-fast train-teacher --class-conditional "
                         f"--label-dropout 0.1")
    features = DigitsFeatures(features_path or DEFAULT_FEATURES)
    classifier = load_classifier(features_path or DEFAULT_FEATURES).eval()
    os.makedirs(out_dir, exist_ok=True)
    seeds = list(range(seed, seed + num_samples))
    shape = (int(teacher.model.in_channels), int(teacher.model.img_resolution), int(teacher.model.img_resolution))
    threads, why = choose_threads(threads, None, os.environ, lambda: pick_threads(
        teacher.model, (2 * batch_size, *shape), label_dim=NUM_CLASSES))
    log(f"CPU threads: {threads} ({why})")
    z, onehot = seeded_latents(seeds, shape, NUM_CLASSES)
    labels = onehot.argmax(1)
    rows: dict[str, dict[str, Any]] = {}
    for w in sorted({1.0, float(scale)}):
        guided_teacher = guided(teacher, teacher, w, guide_labels="zeros")
        t0 = time.perf_counter()
        with torch.no_grad():
            heun = heun_sample(guided_teacher, z, onehot, num_steps=18).float().clamp(-1, 1)
        rows[f"teacher w={w:g}"] = {"w": w, "nfe": 35 if w == 1 else 70, "seconds": time.perf_counter() - t0,
                                    **guided_scores(heun, labels, heun, features, classifier)}
        log(f"w={w:g}: teacher Heun samples in {rows[f'teacher w={w:g}']['seconds']:.0f}s; distilling {steps} steps ...")
        config = demo_config(teacher_path, steps=steps, batch_size=batch_size, lr=lr, N=N,
                             norm=DEMO_DEFAULTS["norm"], huber_c=DEMO_DEFAULTS["huber_c"], ema_rates=[],
                             chunk=steps, seed=seed, progress=progress, power_sigma_rels=[])
        config["teacher"]["guidance"] = {"scale": w, "guide": "unconditional"}
        config["snapshot_every"] = 0
        run_dir = os.path.join(os.fspath(out_dir), f"run-w{w:g}")
        if overwrite and os.path.isdir(run_dir):
            shutil.rmtree(run_dir)
        t0 = time.perf_counter()
        train(config, run_dir, resume=True, threads=threads)
        distill_seconds = time.perf_counter() - t0
        net, meta = load_student(max(list_checkpoints(run_dir))[1], weights="model")
        student, _ = generate(net, meta, seeds, batch=500)
        rows[f"student w={w:g}"] = {"w": w, "nfe": 1, "seconds": distill_seconds,
                                    **guided_scores(student, labels, heun, features, classifier)}
    summary = {"scale": float(scale), "steps": steps, "batch_size": batch_size, "num_samples": num_samples,
               "teacher": teacher_path, "rows": rows, "threads": torch.get_num_threads()}
    with open(os.path.join(os.fspath(out_dir), "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(format_guided_table(summary))
    return summary


def format_guided_table(summary: dict[str, Any]) -> str:
    """The guided demo's table: distance to the (guided) teacher first, then FD to data and accuracy."""
    lines = [f"{'':18s} {'NFE':>4s} {'FD to teacher':>14s} {'RMSE to Heun':>13s} {'FD to data':>11s} "
             f"{'class acc.':>10s} {'time':>7s}"]
    for name, r in summary["rows"].items():
        lines.append(f"{name:18s} {r['nfe']:>4d} {r['fd_to_teacher']:>14.3f} {r['rmse_to_heun']:>13.4f} "
                     f"{r['fd']:>11.3f} {r['accuracy']:>10.3f} {r['seconds']:>6.0f}s")
    lines.append("(each student against its own guided teacher's 18-step Heun samples from the same noise and "
                 "labels; teacher rows: that sample set itself; FD: digits-classifier features; class acc.: the "
                 "digits classifier's accuracy on the samples of each class, averaged over the 10 classes; "
                 f"{summary['steps']} steps of batch {summary['batch_size']}, {summary['num_samples']} samples)")
    return "\n".join(lines)
