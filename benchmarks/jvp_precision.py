"""PID's time derivative by finite difference ("fd") or forward-mode AD ("jvp"), per precision
mode: error against the exact float64 finite difference.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jvp_precision.py \
        --json benchmarks/results/jvp_precision-cpu.json --md benchmarks/results/jvp_precision.md

The digits network (the bundled teacher, its copy as the student, as PID initialises it), the
grid groups of benchmarks/fd_precision.py (N = 250; early 0-9, middle 120-129, late 240-249) and
its precision variants and 16-bit emulation (imported from there). For each variant, group and
derivative, one PID step of the student (the teacher in fp32), compared with float64 runs:

    pred_err    ||pred - pred64_fd|| / ||pred64_fd||: pred = y - t (y - y2)/(t - t2) formed in
                fp64 from the student's F(t), F(t2) ("jvp": F(t2) = F(t) + dF/dc_noise dc_noise),
                against the float64 finite difference. For "jvp" this includes the O(dt) gap
                between the tangent and the chord (the "fp64 jvp" row is that gap alone).
    round_err   the same against float64 with the SAME derivative: the rounding alone.
    grad_cos    cosine of the student's parameter gradient with the float64 fd one.
    loss_err    |loss - loss64_fd| / loss64_fd (max over the groups).
    s/step      seconds of the step (forward + backward), this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fd_precision as fdp  # noqa: E402  (the sibling benchmark: variants, emulation, networks)

from pid_fast.loss import pid_distillation_loss, student_outputs  # noqa: E402
from pid_fast.loss.distillation import default_noise_labels  # noqa: E402

DERIVATIVES = ("fd", "jvp")
# "tf32" is emulated (fd_precision.EmulatedProducts): on the jvp pass its inputs are rounded
# straight-through and the tangents' products stay fp32.
VARIANTS = ("fp32", "tf32", "bf16", "fp16", "bf16-mixed", "fp16-mixed")
NOTES = fdp.NOTES


def precision_context(dtype, emulate, tf32):
    """The student's pass: CPU autocast to ``dtype`` (None: off), optionally emulated (see
    fd_precision.EmulatedProducts)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None))
    if emulate or tf32:
        stack.enter_context(fdp.EmulatedProducts(tf32))
    return stack


def step(student, teacher, noise, indices, derivative, *, dtype=None, emulate=False, tf32=False,
         float64=False):
    """One PID step: loss, flat fp64 gradient, pred (fp64, from the student's F(t), F(t2)), seconds."""
    with precision_context(dtype, emulate, tf32):
        t0 = time.perf_counter()
        per, t, t2 = pid_distillation_loss(
            student, teacher, noise, indices=indices, num_points=fdp.N, derivative=derivative,
            teacher_precision=None if float64 else "fp32", backend="reference" if float64 else None,
            return_times=True)
        loss = per.mean()
        student.zero_grad(set_to_none=True)
        loss.backward()
        seconds = time.perf_counter() - t0
        # The student's outputs again (same inputs, same numerics) for pred; no gradient needed.
        with torch.no_grad():
            sigma_data = float(getattr(teacher, "sigma_data", 0.5))
            f_t, f_t2 = student_outputs(student, noise, None, t, t2, default_noise_labels(teacher),
                                        1.0 / (sigma_data ** 2 + 80.0 ** 2) ** 0.5, derivative=derivative)
    grad = torch.cat([p.grad.reshape(-1).double() if p.grad is not None else torch.zeros(p.numel(), dtype=torch.float64)
                      for p in student.parameters()])
    pred = fdp.pred_of(noise.double(), f_t.detach().double(), f_t2.detach().double(), t.double(), t2.double())
    return float(loss.detach()), grad, pred, seconds


def group_indices(indices, batch):
    if batch < len(indices):
        return torch.tensor([indices[j * len(indices) // batch] for j in range(batch)])
    return torch.tensor([indices[j % len(indices)] for j in range(batch)])


def measure(teacher, student, shape, batch, variants, real16, seed, log):
    """variants x derivatives x groups on one network; returns rows (dicts)."""
    student64 = copy.deepcopy(student).double()
    rows = []
    for number, (group, indices) in enumerate(fdp.GROUPS.items()):
        idx = group_indices(indices, batch)
        gen = torch.Generator().manual_seed(1000 * seed + number)
        noise = 80.0 * torch.randn(batch, *shape, generator=gen)
        ref = {d: step(student64, teacher, noise.double(), idx, d, float64=True) for d in DERIVATIVES}
        loss64, grad64, pred64, _ = ref["fd"]

        def record(variant, autocast, derivative, result):
            loss, grad, pred, seconds = result
            rows.append(dict(variant=variant, autocast=autocast, derivative=derivative, group=group,
                             indices=idx.tolist(), pred_err=fdp.rel(pred, pred64),
                             pred_err_max=max(fdp.per_sample_rel(pred, pred64)),
                             round_err=fdp.rel(pred, ref[derivative][2]),
                             grad_cos=float(grad @ grad64 / (grad.norm() * grad64.norm())),
                             loss=loss, loss64=loss64, loss_err=abs(loss - loss64) / abs(loss64), seconds=seconds))
            r = rows[-1]
            log(f"{group} {variant} [{autocast}] {derivative}: pred {r['pred_err']:.2e} round {r['round_err']:.2e} "
                f"cos {r['grad_cos']:.6f} loss {r['loss_err']:.1e} ({seconds:.2f}s)")

        record("fp64", "none", "jvp", ref["jvp"])
        for variant in variants:
            dtype, parts, tf32 = fdp.parse_variant(variant)
            for autocast in fdp.autocast_kinds(dtype, tf32, real16):
                for derivative in DERIVATIVES:
                    net = copy.deepcopy(student)
                    if parts:
                        fdp.keep_fp32(net, parts)
                    record(variant, autocast, derivative,
                           step(net, teacher, noise, idx, derivative, dtype=dtype,
                                emulate=autocast == "emulated" and dtype is not None, tf32=tf32))
    return rows


def markdown(rows, meta):
    lines = [f"Command: `{meta['command']}`", "",
             f"{meta['machine']}, torch {meta['torch']}, {meta['threads']} thread(s), digits network, N = {fdp.N}, "
             f"batch {meta['batch']} per group; the teacher in fp32 in every row. Errors relative to float64: "
             f"`pred err` against the float64 finite difference (fd), `rounding` against float64 with the same "
             f"derivative. Total {meta['total_seconds']} s.", "",
             "| variant | autocast | derivative | pred err vs fp64 fd, early / middle / late "
             "| rounding only, early / middle / late | grad cosine vs fp64 fd, early / middle / late "
             "| loss err (max) | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for (variant, autocast, derivative), g in fdp.by_group(rows, ("variant", "autocast", "derivative")):
        fmt = lambda key, spec: " / ".join(format(r[key], spec) for r in g)
        lines.append(f"| {variant} | {autocast} | {derivative} | {fmt('pred_err', '.1e')} | {fmt('round_err', '.1e')} "
                     f"| {fmt('grad_cos', '.5f')} | {max(r['loss_err'] for r in g):.1e} "
                     f"| {sum(r['seconds'] for r in g) / len(g):.2f} |")
    return "\n".join(lines) + "\n"


def write_markdown(path, table):
    """The table; a hand-written "## Reading" section below it survives a rerun."""
    notes = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
        notes = old[old.index(NOTES):] if NOTES in old else ""
    with open(path, "w") as f:
        f.write("# Time derivative: finite difference vs forward-mode AD, per precision mode\n\n" + table
                + ("\n" + notes if notes else ""))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help="comma list of precision modes and ablations 'bf16|fp16+part[+part]'")
    p.add_argument("--batch", type=int, default=20,
                   help="noises per group (indices spread over the group; 20: fd_precision's digits rows)")
    p.add_argument("--autocast", choices=("real", "emulated", "both"), default="both",
                   help="16-bit autocast: real CPU autocast or fd_precision's emulation")
    fdp.add_run_arguments(p)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    variants = fdp.parse_variants(args.variants)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    t_start = time.perf_counter()
    teacher, student = fdp.digits_pair()
    rows = measure(teacher, student, (1, 16, 16), args.batch, variants, args.autocast, args.seed, log)
    given = argv if argv is not None else sys.argv[1:]
    meta = dict(command=("OMP_NUM_THREADS=1 .venv/bin/python benchmarks/jvp_precision.py " + " ".join(given)).strip(),
                machine=f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)",
                torch=torch.__version__, threads=args.threads, batch=args.batch,
                total_seconds=round(time.perf_counter() - t_start, 1))
    table = markdown(rows, meta)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.md:
        write_markdown(args.md, table)


if __name__ == "__main__":
    main()
