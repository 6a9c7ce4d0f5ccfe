"""`pid-fast demo`, `train-teacher` and `train-features`: the offline digits demo and the
commands that rebuild its bundled files (pid_fast.demo). ``register(group)`` attaches them to a
click group (the `pid-fast` group of pid_fast/cli/__init__.py).

    pid-fast demo                                          # the whole thing, ~10 min on 2 CPU cores
    pid-fast train-teacher --out pid_fast/assets/digits-teacher.safetensors
    pid-fast train-features --out pid_fast/assets/digits-features.safetensors
"""

from __future__ import annotations

import click

from pid_fast.cli.common import check_out, command_line, set_threads
from pid_fast.cli.requirements import require
from pid_fast.demo.settings import DEMO_DEFAULTS

__all__ = ["train_teacher", "train_features", "demo", "register"]


@click.command("train-teacher")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--steps", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--model-channels", type=click.IntRange(min=4), default=None,
              help="Width of the U-Net (default: that of pid_fast.demo.digits.DIGITS_NETWORK).")
@click.option("--class-conditional", is_flag=True,
              help="A teacher of the 10 digit classes (one-hot labels; zeros: unconditional).")
@click.option("--label-dropout", type=click.FloatRange(min=0, max=1, max_open=True), default=0.0, show_default=True,
              help="Share of labels zeroed in training (with --class-conditional): the teacher then guides itself "
                   "(classifier-free guidance).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-progress", is_flag=True)
def train_teacher(out, steps, batch_size, lr, seed, model_channels, class_conditional, label_dropout, threads,
                  overwrite, no_progress) -> None:
    """Train the digits teacher (EDM's loss, EDM-preconditioned SongUNet) on the CPU.

    The EMA weights go to OUT in pid_fast's teacher format (what `pid-fast convert` writes),
    with the command that reproduces the file in its metadata."""
    check_out(out, overwrite)
    require("eval", "sklearn")  # the digits
    from pid_fast.demo.digits import train_teacher as run

    set_threads(threads)
    options = [("--steps", steps), ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed)]
    if model_channels is not None:
        options.append(("--model-channels", model_channels))
    if class_conditional:
        options += [("--class-conditional", None), ("--label-dropout", label_dropout)]
    if threads is not None:
        options.append(("--threads", threads))
    network = {"model_channels": model_channels} if model_channels is not None else None
    try:
        summary = run(out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, network=network,
                      class_conditional=class_conditional, label_dropout=label_dropout,
                      progress=not no_progress, command=command_line("train-teacher", options + [("--out", out)]))
    except (ValueError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"teacher: {summary['parameters']:,} parameters, final loss {summary['loss']:.4f}, "
               f"{summary['seconds'] / 60:.1f} min -> {out}")


@click.command("train-features")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--epochs", type=click.IntRange(min=1), default=30, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-progress", is_flag=True)
def train_features(out, epochs, seed, threads, overwrite, no_progress) -> None:
    """Train the digits classifier whose 64-d features define the offline digits FD."""
    check_out(out, overwrite)
    require("eval", "sklearn")  # the digits
    from pid_fast.demo.digits import train_classifier

    set_threads(threads)
    options = [("--epochs", epochs), ("--seed", seed)] + ([("--threads", threads)] if threads is not None else [])
    command = command_line("train-features", options + [("--out", out)])
    try:
        summary = train_classifier(out, epochs=epochs, seed=seed, progress=not no_progress, command=command)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"feature network: {summary['parameters']:,} parameters, held-out accuracy "
               f"{summary['test_accuracy']:.4f} (train {summary['train_accuracy']:.4f}), "
               f"{summary['seconds']:.0f}s -> {out}")


@click.command("demo")
@click.option("--out-dir", default="pid-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the run, the pictures and summary.json go.")
@click.option("--steps", type=click.IntRange(min=1), default=None,
              help=f"Distillation steps (default {DEMO_DEFAULTS['steps']}; with --guidance: 400 per student).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size (default 64).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="RAdam learning rate.")
@click.option("--N", "N", type=click.IntRange(min=2), default=None, help="PID grid size (default 250).")
@click.option("--norm", type=click.Choice(["huber", "l2", "l1"]), default=None, help="Loss norm (default huber).")
@click.option("--indices-per-noise", type=click.IntRange(min=1), default=None,
              help=f"Grid points on each noise's trajectory per step (default {DEMO_DEFAULTS['indices_per_noise']}; "
                   f"the networks then run on that many x batch-size rows).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wall-clock budget of the distillation (default 7); it stops at the first chunk past it.")
@click.option("--no-time-limit", is_flag=True, help="Run all --steps whatever the time.")
@click.option("--num-samples", type=click.IntRange(min=2), default=None, help="Samples per FD (default 1000).")
@click.option("--weights", default=None,
              help=f"Student weights to score: 'model' (the raw weights), 'ema-<rate>' or 'auto' (the slowest "
                   f"EMA that has forgotten the initial weights); default {DEMO_DEFAULTS['weights']!r}.")
@click.option("--teacher-share", type=click.FloatRange(min=0, max=1, max_open=True), default=None,
              help=f"Score the chosen weights blended with this share of the initial (teacher's) weights "
                   f"(default {DEMO_DEFAULTS['teacher_share']:g}; 0: unblended; benchmarks/results/convergence.md).")
@click.option("--teacher", "teacher_path", default=None, type=click.Path(dir_okay=False),
              help="Teacher file (default: the bundled digits teacher).")
@click.option("--features", "features_path", default=None, type=click.Path(dir_okay=False),
              help="Digits feature network (default: the bundled one).")
@click.option("--analytic/--no-analytic", default=True, show_default=True,
              help="Also run the Gaussian-mixture check (student error vs N, ~1 min).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT_DIR/run (e.g. with more --steps).")
@click.option("--overwrite", is_flag=True, help="Replace a previous run in OUT_DIR/run (a fresh start).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch CPU threads (default: the faster of 1 and all cores, timed at start-up).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--guidance", type=click.FloatRange(min=0, min_open=True), default=None, metavar="W",
              help="The guided demo instead (pid_fast.demo.guided): distil the bundled class-conditional digits "
                   "teacher with classifier-free guidance at w = 1 and at w = W, and compare each student with its "
                   "guided teacher (FD to its samples, RMSE, FD to data, class accuracy).")
@click.option("--no-progress", is_flag=True)
def demo(out_dir, steps, batch_size, lr, N, norm, indices_per_noise, max_minutes, no_time_limit, num_samples, weights, teacher_share,
         teacher_path,
         features_path, analytic, resume, overwrite, threads, seed, guidance, no_progress) -> None:
    """Distil the bundled digits teacher into a one-step student on the CPU, offline, and
    compare the student (1 step) with the teacher's Heun (35 evaluations) and Euler (1 step):
    first the distance to the teacher's Heun samples from the same noise (FD between the sample
    sets, per-pixel RMSE), then the FD to the real digits."""
    # The digits, the distances, the pictures: all checked before the run, not after it.
    require("eval", "sklearn", "cleanfid", "matplotlib", "PIL")
    if guidance is not None:
        from pid_fast.demo.guided import run_guided_demo

        kwargs = {"steps": steps, "batch_size": batch_size, "lr": lr, "N": N, "num_samples": num_samples}
        try:
            run_guided_demo(out_dir, scale=guidance, teacher_path=teacher_path, features_path=features_path,
                            seed=seed, threads=threads, overwrite=overwrite, progress=not no_progress, log=click.echo,
                            **{k: v for k, v in kwargs.items() if v is not None})
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            raise click.ClickException(str(exc)) from None
        return
    from pid_fast.demo.run import run_demo

    kwargs = {"steps": steps, "batch_size": batch_size, "lr": lr, "N": N, "indices_per_noise": indices_per_noise,
              "norm": norm, "num_samples": num_samples,
              "weights": weights, "teacher_share": teacher_share, "max_minutes": max_minutes}
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    if norm is not None and norm != "huber":
        kwargs["huber_c"] = None
    if no_time_limit:
        kwargs["max_minutes"] = None
    try:
        run_demo(out_dir, teacher_path=teacher_path, features_path=features_path, analytic=analytic, resume=resume,
                 overwrite=overwrite, threads=threads, seed=seed, progress=not no_progress, log=click.echo, **kwargs)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        raise click.ClickException(str(exc)) from None


def register(group: click.Group) -> None:
    """Attach `demo`, `train-teacher` and `train-features` to a click group (e.g. pid_fast.cli.main)."""
    for command in (demo, train_teacher, train_features):
        group.add_command(command)
