"""Fidelity of each precision mode: the digits demo's recipe (pid_fast.demo.settings: DEMO_DEFAULTS,
its steps unless --steps) distilled once per mode, scored first by the distance to the teacher
(FD between the student's and the teacher's Heun samples from the same seeds and the per-pixel
RMSE to them, benchmarks/convergence.py's Scorer, seeds 10000.. of --num samples, the same for
every mode), then the digits FD to the data, for the raw weights and the demo's teacher-share
blend; with the final training loss and the CPU time.

    OMP_NUM_THREADS=1 python benchmarks/precision_fidelity.py --modes fp32 fp16-mixed --emulate

Writes (and merges into) the JSON; `--table` prints the markdown table of a results file (rows
of the earlier protocol, 1200 steps scored by the FD to the data of EMA 0.998, keep their columns).

`--emulate` (for CPUs without native bf16/fp16, where a 16-bit run takes hours): the trainer's
real autocast and fp32 islands, but every 16-bit matrix product / convolution computed in fp32
on 16-bit-rounded inputs with its output rounded to 16 bits (and "tf32" as fp32 products on
TF32-rounded inputs), i.e. benchmarks/fd_precision.py's EmulatedProducts in the forward pass;
the backward pass stays fp32. fd_precision.py shows emulated and real 16-bit runs agree to ~5%
on the residual's error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # fd_precision's emulation


@contextlib.contextmanager
def _emulated_autocast(mode: str, device_type: str):
    from fd_precision import EmulatedProducts

    from pid_fast.models.precision import autocast_for

    with autocast_for(mode, device_type), EmulatedProducts(tf32=mode == "tf32"):
        yield


def run_mode(mode: str, work_dir: str, steps: int, num: int, threads: int, emulate: bool = False,
             derivative: str = "fd") -> dict:
    from convergence import Scorer, load_weights

    from pid_fast.demo.digits import DEFAULT_TEACHER
    from pid_fast.demo.settings import DEMO_DEFAULTS, demo_config
    from pid_fast.train import train

    torch.set_num_threads(threads)
    d = DEMO_DEFAULTS
    cfg = demo_config(DEFAULT_TEACHER, steps=steps, batch_size=d["batch_size"], lr=d["lr"], N=d["N"],
                      norm=d["norm"], huber_c=d["huber_c"], ema_rates=d["ema_rates"], chunk=steps,
                      progress=False)
    cfg.update(precision=mode, snapshot_every=0, log_every=50)
    cfg["loss"]["derivative"] = derivative
    key = mode if derivative == "fd" else f"{mode}+{derivative}"
    run_dir = os.path.join(work_dir, key)
    if emulate:
        import pid_fast.train.loop as loop

        loop.autocast_for = _emulated_autocast  # the loop's autocast, with emulated 16-bit products
    cpu0, wall0 = time.process_time(), time.perf_counter()
    summary = train(cfg, run_dir)
    cpu_s, wall_s = time.process_time() - cpu0, time.perf_counter() - wall0
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
    out = {"mode": key, "derivative": derivative, "emulated": emulate and mode != "fp32", "steps": steps,
           "final_loss": summary["loss"], "last_200_steps_loss": losses[-4:],
           "train_cpu_s": cpu_s, "train_wall_s": wall_s, "threads": threads, "num": num, "scores": {}}
    scorer = Scorer(10000, num)
    for weights in (f"model+teacher-{d['teacher_share']:g}", "model"):
        out["scores"][weights] = scorer.student(*load_weights(run_dir, weights))
    return out


def table(results: dict) -> str:
    if any("scores" in r for r in results["runs"].values()):
        return _teacher_table(results)
    rows = results["runs"]
    ref = rows.get("fp32", {}).get("fd_ema-0.998")
    lines = [f"Command: `{results['command']}`", "",
             "| mode | emulated | FD (EMA 0.998) | FD / fp32 FD | FD (raw weights) | final loss | train CPU s |",
             "|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        ratio = f"{r['fd_ema-0.998'] / ref:.3f}" if ref else "-"
        lines.append(f"| {mode} | {'yes' if r.get('emulated') else 'no'} | {r['fd_ema-0.998']:.3f} | {ratio} | {r['fd_model']:.3f} | "
                     f"{r['final_loss']:.4g} | {r['train_cpu_s']:.0f} |")
    return "\n".join(lines)


def _teacher_table(results: dict) -> str:
    rows = {mode: r for mode, r in results["runs"].items() if "scores" in r}
    ref = rows.get("fp32")
    lines = [f"Command: `{results['command']}`", "",
             "| mode | emulated | weights | FD to teacher | RMSE to Heun | FD to data | FD to teacher / fp32's | "
             "final loss | train CPU s |", "|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        for weights, sc in r["scores"].items():
            base = ref["scores"].get(weights, {}).get("fd_teacher") if ref else None
            ratio = f"{sc['fd_teacher'] / base:.3f}" if base else "-"
            lines.append(f"| {mode} | {'yes' if r.get('emulated') else 'no'} | {weights} | {sc['fd_teacher']:.3f} | "
                         f"{sc['rmse_teacher']:.4f} | {sc['fd']:.3f} | {ratio} | {r['final_loss']:.4g} | "
                         f"{r['train_cpu_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16-mixed", "fp16", "fp16-mixed"])
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the demo's)")
    p.add_argument("--num", type=int, default=10000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/pid-precision-fidelity")
    p.add_argument("--out", default="benchmarks/results/precision_fidelity_teacher-cpu.json")
    p.add_argument("--emulate", action="store_true", help="emulate 16-bit products (see above)")
    p.add_argument("--derivative", default="fd", choices=("fd", "jvp"), help="the loss's time derivative")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args()
    if args.steps is None:
        from pid_fast.demo.settings import DEMO_DEFAULTS

        args.steps = DEMO_DEFAULTS["steps"]
    results = {"command": "", "runs": {}}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    if args.table:
        print(table(results))
        return
    results["command"] = ("OMP_NUM_THREADS=1 python benchmarks/precision_fidelity.py --modes "
                          + " ".join(args.modes) + f" --steps {args.steps} --num {args.num}"
                          + (" --emulate" if args.emulate else "") + f" --derivative {args.derivative}")
    for mode in args.modes:
        row = run_mode(mode, args.work_dir, args.steps, args.num, args.threads, args.emulate, args.derivative)
        results["runs"][row["mode"]] = row
        results["torch"] = torch.__version__
        with open(args.out, "w") as f:  # after every mode: a partial run keeps what it measured
            json.dump(results, f, indent=2)
        print(json.dumps(row))
    print(table(results))


if __name__ == "__main__":
    main()
