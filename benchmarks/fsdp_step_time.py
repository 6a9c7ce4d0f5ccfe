"""CPU step time of parallel 'ddp' vs 'fsdp' at 2 local processes (gloo), and their equality.

Both runs train the same config (a small EDM-style U-Net distilled from a copy of itself, fp32,
2 accumulation rounds) in the same two processes (pid_fast.train.launch.train_local_runs); the
time per step is the mean of log.jsonl's images/s over the steps after the first log window.
The printed equality numbers are the max |ddp - fsdp| of the per-step losses and of the final
weights (fsdp's sharded checkpoint read back as full weights). CPU numbers on this machine
(gloo, one thread per process), not a GPU figure.

    OMP_NUM_THREADS=1 python benchmarks/fsdp_step_time.py --steps 20 --channels 32
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from pid_fast.train import apply_overrides, load_latest_checkpoint
from pid_fast.train.launch import train_local_runs


def config(steps: int, channels: int, batch: int) -> dict:
    net = {"name": "tiny-ddpmpp", "model_channels": channels, "channel_mult": [1, 2], "attn_resolutions": []}
    return {"device": "cpu", "teacher": {"kind": "network", "network": net, "precond": "edm", "seed": 0},
            "student": {"init": "teacher", "network": None, "seed": 1}, "batch_size": batch, "accum": 2,
            "total_steps": steps, "log_every": 1, "checkpoint_every": steps, "snapshot_every": 0, "progress": False,
            "ema_rates": [0.99], "optimizer": {"lr": 1e-3}, "precision": "fp32"}


def _records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    args = p.parse_args()
    cfg = config(args.steps, args.channels, args.batch)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = {mode: os.path.join(tmp, mode) for mode in ("ddp", "fsdp")}
        train_local_runs([(apply_overrides(cfg, {"parallel": mode}), dirs[mode], False) for mode in dirs], 2)
        records = {mode: _records(d) for mode, d in dirs.items()}
        states = {mode: load_latest_checkpoint(d)[1] for mode, d in dirs.items()}
    loss_diff = max(abs(a["loss"] - b["loss"]) for a, b in zip(records["ddp"], records["fsdp"]))
    weight_diff = max(float((states["ddp"]["model"][k] - states["fsdp"]["model"][k]).abs().max())
                      for k in states["ddp"]["model"])
    ema_diff = max(float((states["ddp"]["ema"]["0.99"][k] - states["fsdp"]["ema"]["0.99"][k]).abs().max())
                   for k in states["ddp"]["ema"]["0.99"])
    params = sum(v.numel() for v in states["ddp"]["model"].values())
    print(f"student {params} parameters, global batch {args.batch} (2 processes x 2 accumulation rounds), "
          f"{args.steps} steps, fp32, CPU (gloo)")
    for mode in ("ddp", "fsdp"):
        rates = [r["images_per_s"] for r in records[mode][1:]]
        per_step = args.batch / (sum(rates) / len(rates))
        print(f"{mode:5s} {1e3 * per_step:8.1f} ms/step (CPU)  final loss {records[mode][-1]['loss']:.6g}")
    print(f"max |loss ddp - fsdp| over {len(records['ddp'])} steps: {loss_diff:.3g}")
    print(f"max |weights ddp - fsdp| final: {weight_diff:.3g}; EMA 0.99: {ema_diff:.3g}")


if __name__ == "__main__":
    main()
