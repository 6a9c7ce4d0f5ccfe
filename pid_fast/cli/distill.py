"""`pid-fast distill` and `pid-fast sample`: click commands around pid_fast.train.trainer.

They are plain click commands; ``register(group)`` attaches them to a click group (the
`pid-fast` group of pid_fast/cli.py).

    pid-fast distill --config configs/tiny-cpu.json --run-dir runs/tiny --total-steps 200
    torchrun --nproc_per_node 8 -m pid_fast.cli distill --config configs/cifar10-uncond.json --run-dir runs/c10
    pid-fast distill --config configs/cifar10-uncond.json --run-dir runs/c10 --resume
    pid-fast sample runs/tiny samples.npz --num 1000 --weights ema-0.999
"""

from __future__ import annotations

import os

import click

__all__ = ["distill", "sample", "register"]


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


@click.command("distill")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="JSON (or YAML with PyYAML) config; unspecified keys take the defaults of "
                   "pid_fast.train.trainer.DEFAULT_CONFIG.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False),
              help="Folder for checkpoints, log.jsonl, sample grids and config.json.")
@click.option("--resume", is_flag=True, help="Continue from the newest checkpoint in --run-dir (fresh start if none).")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config entry, e.g. --set optimizer.lr=1e-4 --set loss.norm=huber (repeatable; "
                   "values are parsed as JSON when they parse).")
@click.option("--total-steps", type=int, default=None, help="Stop after this many optimizer steps.")
@click.option("--batch-size", type=int, default=None, help="Global batch size (all ranks, all accumulation rounds).")
@click.option("--accum", type=int, default=None, help="Gradient accumulation rounds per step.")
@click.option("--lr", type=float, default=None, help="Learning rate.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default=None,
              help="Student autocast precision (auto: bf16 on CUDA, fp32 on CPU).")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default=None)
@click.option("--seed", type=int, default=None)
@click.option("--checkpoint-every", type=int, default=None, help="Write a checkpoint every K steps.")
@click.option("--snapshot-every", type=int, default=None, help="Write a PNG grid of one-step samples every K steps.")
@click.option("--log-every", type=int, default=None, help="Log loss and images/s every K steps.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def distill(config_path, run_dir, resume, overrides, total_steps, batch_size, accum, lr, precision, device, seed,
            checkpoint_every, snapshot_every, log_every, no_progress) -> None:
    """Distil a diffusion teacher into a one-step student with PID."""
    from pid_fast.train.trainer import NonFiniteLossError, apply_overrides, load_config, resolve_config, train

    named = {"total_steps": total_steps, "batch_size": batch_size, "accum": accum, "optimizer.lr": lr,
             "precision": precision, "device": device, "seed": seed, "checkpoint_every": checkpoint_every,
             "snapshot_every": snapshot_every, "log_every": log_every}
    named = {k: v for k, v in named.items() if v is not None}
    if no_progress:
        named["progress"] = False
    try:
        config = load_config(config_path) if config_path else {}
        config = apply_overrides(config, list(overrides))
        config = resolve_config(apply_overrides(config, named))
    except (ValueError, TypeError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    try:
        summary = train(config, run_dir, resume=resume)
    except NonFiniteLossError as exc:
        raise click.ClickException(str(exc)) from None
    except ValueError as exc:  # e.g. resuming with an incompatible config
        raise click.ClickException(str(exc)) from None
    if _rank() == 0:
        loss = "n/a" if summary["loss"] is None else f"{summary['loss']:.6g}"
        ips = "n/a" if summary["images_per_s"] is None else f"{summary['images_per_s']:.1f}"
        click.echo(f"done: step {summary['step']}, loss {loss}, {ips} images/s, checkpoint {summary['checkpoint']}")


@click.command("sample")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out", type=click.Path())
@click.option("--num", type=int, default=64, show_default=True, help="Number of images.")
@click.option("--seed-start", type=int, default=0, show_default=True,
              help="Image k uses seed seed_start + k (its latents and class label depend only on it).")
@click.option("--batch", type=int, default=64, show_default=True)
@click.option("--weights", default="model", show_default=True,
              help="'model', 'ema' (the slowest EMA) or 'ema-<rate>', e.g. ema-0.9999.")
@click.option("--class-label", type=int, default=None, help="Fixed class for class-conditional students.")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
def sample(checkpoint, out, num, seed_start, batch, weights, class_label, device) -> None:
    """One-step samples from a training CHECKPOINT (a file or a run folder) into OUT: a
    folder of PNGs, or an .npz with 'images' (uint8 NHWC), 'x' (float32 NCHW in [-1, 1],
    unquantised), 'seeds' and 'labels'."""
    import numpy as np
    import torch

    from pid_fast.train.trainer import generate, load_student, save_images, to_uint8

    if num < 1:
        raise click.BadParameter("must be >= 1", param_hint="--num")
    if batch < 1:
        raise click.BadParameter("must be >= 1", param_hint="--batch")
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    try:
        net, meta = load_student(checkpoint, weights=weights, device=device)
        seeds = list(range(seed_start, seed_start + num))
        x, labels = generate(net, meta, seeds, batch=batch, device=device, class_label=class_label)
    except (ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from None
    if out.endswith(".npz"):
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        np.savez(out, images=to_uint8(x), x=x.numpy(), seeds=np.asarray(seeds, dtype=np.int64),
                 labels=np.asarray([] if labels is None else labels.numpy(), dtype=np.int64))
    else:
        save_images(x, out, [f"{s:06d}" for s in seeds])
    click.echo(f"{num} samples from {meta['path']} (step {meta['step']}, {weights}) -> {out}")


def register(group: click.Group) -> None:
    """Attach `distill` and `sample` to a click group (e.g. pid_fast.cli.main)."""
    group.add_command(distill)
    group.add_command(sample)
