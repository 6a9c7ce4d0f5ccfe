"""Fidelity of each precision mode: the digits demo recipe (pid-fast demo's: 1200 steps x batch 64,
RAdam 2e-3, N = 250, pseudo-Huber, EMAs 0.995/0.998, seed 0) distilled once per mode, scored by
the digits FD of 5000 one-step samples (seeds 10000..14999, EMA 0.998, the same samples for
every mode), with the final training loss and the CPU time.

    OMP_NUM_THREADS=1 python benchmarks/precision_fidelity.py --modes fp32 bf16 bf16-mixed \
        --out benchmarks/results/precision_fidelity-cpu.json

Writes (and merges into) the JSON; `--table` prints the markdown table of a results file.

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
    from pid_fast.demo.digits import DEFAULT_TEACHER
    from pid_fast.demo.settings import DEMO_DEFAULTS, demo_config
    from pid_fast.eval.metrics import digits_fd
    from pid_fast.train import generate, load_student, train

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
    out = {"mode": key, "derivative": derivative, "emulated": emulate and mode != "fp32", "steps": steps, "final_loss": summary["loss"], "last_200_steps_loss": losses[-4:],
           "train_cpu_s": cpu_s, "train_wall_s": wall_s, "threads": threads}
    for weights in ("ema-0.998", "model"):
        net, meta = load_student(run_dir, weights=weights)
        images, _ = generate(net, meta, range(10000, 10000 + num), batch=500)
        out[f"fd_{weights}"] = float(digits_fd(images))
    return out


def table(results: dict) -> str:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", nargs="+", default=["fp32", "bf16", "bf16-mixed", "fp16", "fp16-mixed"])
    p.add_argument("--steps", type=int, default=1200)
    p.add_argument("--num", type=int, default=5000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work-dir", default="/tmp/pid-precision-fidelity")
    p.add_argument("--out", default="benchmarks/results/precision_fidelity-cpu.json")
    p.add_argument("--emulate", action="store_true", help="emulate 16-bit products (see above)")
    p.add_argument("--derivative", default="fd", choices=("fd", "jvp"), help="the loss's time derivative")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    args = p.parse_args()
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
