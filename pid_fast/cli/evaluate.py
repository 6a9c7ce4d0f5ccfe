"""`pid-fast train-teacher`, `train-features`, `fid` and `demo`: click commands around
pid_fast.demo.digits, pid_fast.eval.metrics and pid_fast.demo. ``register(group)`` attaches them to a
click group (the `pid-fast` group of pid_fast/cli.py).

    pid-fast demo                                          # the whole thing, ~10 min on 2 CPU cores
    pid-fast train-teacher --out pid_fast/assets/digits-teacher.safetensors
    pid-fast train-features --out pid_fast/assets/digits-features.safetensors
    pid-fast fid runs/c10 --ref cifar10-32x32.npz --inception inception-2015-12-05.pt --num 50000
    pid-fast fid samples/ --features digits --kid
"""

from __future__ import annotations

import os
import pickle
import shlex

import click

__all__ = ["train_teacher", "train_features", "fid", "demo", "register"]


def _set_threads(threads):
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def _check_out(out: str, overwrite: bool) -> None:
    if os.path.exists(out) and not overwrite:
        raise click.UsageError(f"{out} exists; pass --overwrite to replace it")


def _command(name: str, options: list[tuple[str, object]]) -> str:
    parts = ["pid-fast", name]
    for flag, value in options:
        parts += [flag, str(value)]
    return " ".join(shlex.quote(p) for p in parts)


@click.command("train-teacher")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="Output .safetensors file.")
@click.option("--steps", type=click.IntRange(min=1), default=4000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=2e-3, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--model-channels", type=click.IntRange(min=4), default=None,
              help="Width of the U-Net (default: that of pid_fast.demo.digits.DIGITS_NETWORK).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads (default: all cores).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
@click.option("--no-progress", is_flag=True)
def train_teacher(out, steps, batch_size, lr, seed, model_channels, threads, overwrite, no_progress) -> None:
    """Train the digits teacher (EDM's loss, EDM-preconditioned SongUNet) on the CPU.

    The EMA weights go to OUT in pid_fast's teacher format (what `pid-fast convert` writes),
    with the command that reproduces the file in its metadata."""
    from pid_fast.demo.digits import train_teacher as run

    _check_out(out, overwrite)
    _set_threads(threads)
    options = [("--steps", steps), ("--batch-size", batch_size), ("--lr", lr), ("--seed", seed)]
    if model_channels is not None:
        options.append(("--model-channels", model_channels))
    if threads is not None:
        options.append(("--threads", threads))
    network = {"model_channels": model_channels} if model_channels is not None else None
    try:
        summary = run(out, steps=steps, batch_size=batch_size, lr=lr, seed=seed, network=network,
                      progress=not no_progress, command=_command("train-teacher", options + [("--out", out)]))
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
    from pid_fast.demo.digits import train_classifier

    _check_out(out, overwrite)
    _set_threads(threads)
    options = [("--epochs", epochs), ("--seed", seed)] + ([("--threads", threads)] if threads is not None else [])
    command = _command("train-features", options + [("--out", out)])
    try:
        summary = train_classifier(out, epochs=epochs, seed=seed, progress=not no_progress, command=command)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"feature network: {summary['parameters']:,} parameters, held-out accuracy "
               f"{summary['test_accuracy']:.4f} (train {summary['train_accuracy']:.4f}), "
               f"{summary['seconds']:.0f}s -> {out}")


def _is_checkpoint(path: str) -> bool:
    from pid_fast.train.trainer import list_checkpoints

    return (os.path.isfile(path) and path.endswith(".pt")) or (os.path.isdir(path) and bool(list_checkpoints(path)))


@click.command("fid")
@click.argument("source", type=click.Path(exists=True))
@click.option("--ref", default=None,
              help="Reference: an .npz with 'mu' and 'sigma' (EDM / clean-fid statistics), or a folder / .npz of "
                   "images. Default with --features digits: the 1797 digits.")
@click.option("--features", "feature_kind", type=click.Choice(["inception", "digits"]), default="inception",
              show_default=True, help="clean-fid's legacy_tensorflow Inception, or the bundled digits classifier.")
@click.option("--inception", "inception_path", default=None, metavar="PATH",
              help="Local inception-2015-12-05.pt (or its folder); required with --features inception.")
@click.option("--feature-net", default=None, metavar="PATH", help="Digits classifier (default: the bundled one).")
@click.option("--num", type=click.IntRange(min=2), default=None,
              help="Number of images (default: all of SOURCE; 50000 for a checkpoint).")
@click.option("--seed-start", type=click.IntRange(min=0), default=0, show_default=True,
              help="Checkpoint SOURCE: image k uses seed seed_start + k.")
@click.option("--weights", default="model", show_default=True,
              help="Checkpoint SOURCE: 'model', 'ema' or 'ema-<rate>'.")
@click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--kid", is_flag=True, help="Also report KID (needs reference images, not only statistics).")
@click.option("--save-stats", default=None, metavar="OUT.npz", help="Write SOURCE's (mu, sigma) to this .npz.")
def fid(source, ref, feature_kind, inception_path, feature_net, num, seed_start, weights, batch, device, kid,
        save_stats) -> None:
    """Frechet distance of SOURCE against reference statistics, computed with clean-fid.

    SOURCE is a folder of images, an .npz of images ('x' float NCHW in [-1, 1], or uint8
    'images'/'arr_0'), or a `pid-fast distill` checkpoint / run folder, whose one-step samples
    are generated and scored unquantised (the PID reference code's protocol: 50k samples,
    legacy_tensorflow Inception on float images). Nothing is downloaded: pass --inception.
    Without --ref, only --save-stats is done (e.g. to build reference statistics)."""
    import torch

    from pid_fast.eval import metrics

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    if feature_kind == "inception" and ref is None and save_stats is None:
        raise click.UsageError("give --ref (reference statistics or images) and/or --save-stats")
    try:
        if feature_kind == "inception":
            extractor = metrics.InceptionFeatures(inception_path, device=device)
        else:
            extractor = metrics.DigitsFeatures(feature_net, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None

    try:
        if _is_checkpoint(source):
            from pid_fast.train.trainer import generate, load_student

            net, meta = load_student(source, weights=weights, device=device)
            n = num or 50000
            click.echo(f"generating {n} one-step samples from {meta['path']} (step {meta['step']}, {weights}) ...")
            images, _ = generate(net, meta, range(seed_start, seed_start + n), batch=batch, device=device)
        else:
            images = metrics.load_images(source, num=num)
        feats = metrics.features_of(extractor, images, batch=batch, device=device)
        click.echo(f"{source}: {feats.shape[0]} images, {feats.shape[1]}-d {feature_kind} features")
        if save_stats:
            metrics.save_reference_stats(save_stats, feats)
            click.echo(f"statistics -> {save_stats}")
        ref_feats = None
        if ref is None and feature_kind == "digits":
            ref_feats = metrics.digits_reference_features(extractor)
            ref_stats = metrics.feature_statistics(ref_feats)
            ref_name = "the 1797 digits"
        elif ref is None:
            return
        else:
            ref_name = ref
            is_stats = False
            if ref.endswith(".npz") and os.path.isfile(ref):
                with metrics._open_npz(ref, "--ref") as data:
                    is_stats = "mu" in data and "sigma" in data
            if is_stats:
                ref_stats = metrics.load_reference_stats(ref)
            else:
                ref_feats = metrics.features_of(extractor, metrics.load_images(ref), batch=batch, device=device)
                ref_stats = metrics.feature_statistics(ref_feats)
        if ref_stats[0].shape[0] != feats.shape[1]:
            raise ValueError(f"--ref: {ref_name} holds {ref_stats[0].shape[0]}-d statistics but the {feature_kind} "
                             f"features are {feats.shape[1]}-d")
        value = metrics.fd_from_features(feats, ref_stats)
        name = "FID" if feature_kind == "inception" else "digits FD"
        click.echo(f"{name} vs {ref_name}: {value:.4f}")
        if kid:
            if ref_feats is None:
                raise click.UsageError("--kid needs reference images (KID is not computable from mu/sigma)")
            click.echo(f"KID vs {ref_name}: {metrics.kernel_distance(feats, ref_feats):.6f}")
    except (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError) as exc:  # e.g. a broken .pt
        raise click.ClickException(str(exc)) from None


@click.command("demo")
@click.option("--out-dir", default="pid-demo", show_default=True, type=click.Path(file_okay=False),
              help="Where the run, the pictures and summary.json go.")
@click.option("--steps", type=click.IntRange(min=1), default=None, help="Distillation steps (default 1200).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Batch size (default 64).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None, help="RAdam learning rate.")
@click.option("--N", "N", type=click.IntRange(min=2), default=None, help="PID grid size (default 250).")
@click.option("--norm", type=click.Choice(["huber", "l2", "l1"]), default=None, help="Loss norm (default huber).")
@click.option("--max-minutes", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Wall-clock budget of the distillation (default 7); it stops at the first chunk past it.")
@click.option("--no-time-limit", is_flag=True, help="Run all --steps whatever the time.")
@click.option("--num-samples", type=click.IntRange(min=2), default=None, help="Samples per FD (default 1000).")
@click.option("--weights", default=None,
              help="Student weights to score: 'auto' (default: the slowest EMA that has forgotten the "
                   "initial weights), 'model' or 'ema-<rate>'.")
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
@click.option("--no-progress", is_flag=True)
def demo(out_dir, steps, batch_size, lr, N, norm, max_minutes, no_time_limit, num_samples, weights, teacher_path,
         features_path, analytic, resume, overwrite, threads, seed, no_progress) -> None:
    """Distil the bundled digits teacher into a one-step student on the CPU, offline, and
    compare: FD of the student (1 step), the teacher's Heun (35 evaluations) and Euler (1 step)."""
    from pid_fast.demo.run import run_demo

    kwargs = {"steps": steps, "batch_size": batch_size, "lr": lr, "N": N, "norm": norm, "num_samples": num_samples,
              "weights": weights, "max_minutes": max_minutes}
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
    """Attach `train-teacher`, `train-features`, `fid` and `demo` to a click group (e.g. pid_fast.cli.main)."""
    for command in (train_teacher, train_features, fid, demo):
        group.add_command(command)
