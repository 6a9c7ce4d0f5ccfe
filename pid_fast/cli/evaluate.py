"""`pid-fast fid`: Frechet distance (and KID) of images, a checkpoint, or every checkpoint of a
run, computed with clean-fid. ``register(group)`` attaches it to a click group (the `pid-fast`
group of pid_fast/cli/__init__.py).

With ``--teacher-samples`` (the teacher's multi-step samples, e.g. `pid-fast sample --teacher`'s
.npz) or ``--against-teacher`` (a teacher, sampled here), the distance to the teacher comes first:
the FD between the student's and the teacher's samples from the same seeds and labels, and the
per-sample RMSE (LPIPS with --lpips) to them; ``--all-checkpoints`` then picks the best by it.

    pid-fast fid runs/c10 --teacher-samples teacher-c10.npz --ref cifar10-32x32.npz --inception inception-2015-12-05.pt
    pid-fast fid runs/c10 --ref cifar10-32x32.npz --inception inception-2015-12-05.pt --num 50000
    pid-fast fid samples/ --features digits --kid
    pid-fast fid pid-demo/run --features digits --all-checkpoints --num 5000 --against-teacher pid-demo/run/config.json
"""

from __future__ import annotations

import os
import pickle

import click

from pid_fast.cli.common import pick_device
from pid_fast.cli.requirements import require

__all__ = ["fid", "register"]

# What a broken input raises on its way through the scoring (e.g. a damaged .pt or .npz).
# ImportError: a diffusers student's checkpoint without diffusers installed.
_INPUT_ERRORS = (FileNotFoundError, ValueError, RuntimeError, pickle.UnpicklingError, ImportError)


def _is_checkpoint(path: str) -> bool:
    """A training checkpoint or run folder, or an EDM snapshot / converted file (one-step generators)."""
    from pid_fast.eval.checkpoints import is_edm_generator_file
    from pid_fast.train import list_checkpoints

    return ((os.path.isfile(path) and path.endswith(".pt")) or is_edm_generator_file(path)
            or (os.path.isdir(path) and bool(list_checkpoints(path))))


def _extractor(feature_kind: str, inception_path, feature_net, device: str):
    from pid_fast.eval import metrics

    try:
        if feature_kind == "inception":
            return metrics.InceptionFeatures(inception_path, device=device)
        return metrics.DigitsFeatures(feature_net, device=device)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


def _reference(ref, feature_kind: str, extractor, batch: int, device: str):
    """(name, (mu, sigma), features or None) of the reference; None without one (inception)."""
    from pid_fast.eval import metrics

    if ref is None and feature_kind == "digits":
        feats = metrics.digits_reference_features(extractor)
        return "the 1797 digits", metrics.feature_statistics(feats), feats
    if ref is None:
        return None
    is_stats = False
    if ref.endswith(".npz") and os.path.isfile(ref):
        with metrics._open_npz(ref, "--ref") as data:
            is_stats = "mu" in data and "sigma" in data
    if is_stats:
        return ref, metrics.load_reference_stats(ref), None
    feats = metrics.features_of(extractor, metrics.load_images(ref), batch=batch, device=device)
    return ref, metrics.feature_statistics(feats), feats


def _teacher_reference(teacher_samples_path, teacher_source, *, extractor, num, seed_start, teacher_sampler,
                       teacher_steps, lpips, batch, device):
    """(TeacherDistance, the seeds its samples come from (None: a folder of images, paired by
    order), description) of --teacher-samples / --against-teacher, or None without either."""
    import numpy as np

    from pid_fast.eval import metrics

    if teacher_samples_path is None and teacher_source is None:
        return None
    seeds = None
    if teacher_source is not None:
        from pid_fast.train.teacher_samples import load_sampling_teacher, teacher_samples

        teacher, shape, label_dim = load_sampling_teacher(teacher_source, device=device, name="--against-teacher")
        n = num or 50000
        seeds = list(range(seed_start, seed_start + n))
        click.echo(f"sampling the teacher {teacher_source}: {n} samples, {teacher_sampler} {teacher_steps} steps "
                   f"(seeds {seed_start}..{seed_start + n - 1}) ...")
        images, _ = teacher_samples(teacher, shape, label_dim, seeds, solver=teacher_sampler, num_steps=teacher_steps,
                                    batch=batch, device=device)
        how = f"{teacher_sampler} {teacher_steps} steps"
    else:
        images = metrics.load_images(teacher_samples_path)
        if teacher_samples_path.endswith(".npz"):
            with metrics._open_npz(teacher_samples_path, "--teacher-samples") as data:
                if "seeds" in data:
                    seeds = [int(k) for k in np.asarray(data["seeds"])]
            if seeds is not None and len(seeds) != images.shape[0]:
                raise ValueError(f"--teacher-samples: {teacher_samples_path!r} holds {images.shape[0]} images but "
                                 f"{len(seeds)} seeds")
        how = teacher_samples_path
        if num is not None and num != images.shape[0]:
            raise ValueError(f"--num: {num} samples asked, but --teacher-samples holds {images.shape[0]} (the "
                             f"student is scored on the teacher's samples' seeds; leave --num out)")
    return metrics.TeacherDistance(images, extractor, batch=batch, device=device, lpips=lpips), seeds, how


def _echo_teacher_distance(scores: dict, how: str) -> None:
    # (an FD of identical sets can come out as -1e-9 from the matrix square root: shown as 0)
    click.echo(f"distance to the teacher's samples ({how}, same seeds): FD {max(scores['fd_teacher'], 0.0):.4f}, "
               f"RMSE {scores['rmse_teacher']:.4f}"
               + (f", LPIPS {scores['lpips_teacher']:.4f}" if "lpips_teacher" in scores else ""))


def _score_source(source, *, extractor, feature_kind, ref, num, seed_start, weights, batch, device, kid,
                  save_stats, vae=None, teacher=None) -> None:
    """The single-source path: SOURCE's features, then its distance to the teacher's samples (with
    ``teacher``: ``_teacher_reference``'s), then to the reference."""
    from pid_fast.eval import metrics

    teacher_distance, teacher_seeds, how = teacher if teacher is not None else (None, None, None)
    if _is_checkpoint(source):
        from pid_fast.eval.checkpoints import load_scored_student
        from pid_fast.train import generate

        net, meta, used = load_scored_student(source, weights=weights, device=device)
        seeds = teacher_seeds if teacher_seeds is not None else range(seed_start, seed_start + (num or 50000))
        n = len(seeds)
        how = f"{used}, picked by the 'auto' rule" if weights == "auto" else used
        click.echo(f"generating {n} one-step samples from {meta['path']} (step {meta['step']}, weights {how}) ...")
        decode = None
        if vae is not None:  # a latent student: its samples go through the VAE (pid_fast.eval.vae)
            from pid_fast.eval.vae import student_decoder
            decode = student_decoder(vae, net, device=device)
        images, _ = generate(net, meta, seeds, batch=batch, device=device, decode=decode)
    else:
        images = metrics.load_images(source, num=num)
    feats = metrics.features_of(extractor, images, batch=batch, device=device)
    click.echo(f"{source}: {feats.shape[0]} images, {feats.shape[1]}-d {feature_kind} features")
    if teacher_distance is not None:
        if tuple(images.shape) != tuple(teacher_distance.images.shape):
            raise ValueError(f"--teacher-samples: the teacher's samples are {tuple(teacher_distance.images.shape)}, "
                             f"SOURCE's {tuple(images.shape)}; score the same seeds (one image per teacher sample)")
        _echo_teacher_distance(teacher_distance.from_features(feats, images), how)
    if save_stats:
        metrics.save_reference_stats(save_stats, feats)
        click.echo(f"statistics -> {save_stats}")
    reference = _reference(ref, feature_kind, extractor, batch, device)
    if reference is None:
        return
    ref_name, ref_stats, ref_feats = reference
    if ref_stats[0].shape[0] != feats.shape[1]:
        raise ValueError(f"--ref: {ref_name} holds {ref_stats[0].shape[0]}-d statistics but the {feature_kind} "
                         f"features are {feats.shape[1]}-d")
    name = "FID" if feature_kind == "inception" else "digits FD"
    click.echo(f"{name} vs {ref_name}: {metrics.fd_from_features(feats, ref_stats):.4f}")
    if kid:
        if ref_feats is None:
            raise click.UsageError("--kid needs reference images (KID is not computable from mu/sigma)")
        click.echo(f"KID vs {ref_name}: {metrics.kernel_distance(feats, ref_feats):.6f}")


def _score_run(run_dir, *, extractor, feature_kind, ref, num, seed_start, batch, device, kid, teacher=None) -> None:
    """--all-checkpoints: every checkpoint x every weight set, a table, a plot and the best (by
    the FD to the teacher's samples when ``teacher`` is given, else by the FD to the reference)."""
    from pid_fast.eval import checkpoints

    reference = _reference(ref, feature_kind, extractor, batch, device)
    ref_name, ref_stats, ref_feats = reference if reference is not None else (None, None, None)
    if kid and ref_feats is None:
        raise click.UsageError("--kid needs reference images (KID is not computable from mu/sigma)")
    name = "FID" if feature_kind == "inception" else "digits FD"
    teacher_distance, teacher_seeds, how = teacher if teacher is not None else (None, None, None)
    if teacher_distance is not None and teacher_seeds is None:
        raise click.UsageError("--all-checkpoints generates from seeds: give --teacher-samples as an .npz with "
                               "'seeds' (`pid-fast sample --teacher`) or use --against-teacher")
    seeds = list(teacher_seeds) if teacher_seeds is not None else list(range(seed_start, seed_start + (num or 50000)))
    n = len(seeds)
    click.echo(f"scoring every checkpoint of {run_dir} with the raw weights and every EMA: {n} one-step samples "
               f"each (seeds {seeds[0]}..{seeds[-1]}), "
               + (f"distance to the teacher's samples ({how}) first, " if teacher_distance is not None else "")
               + (f"{name} vs {ref_name}" if ref_name is not None else "")
               + (" and KID" if ref_feats is not None else ""))
    score = checkpoints.fd_scorer(extractor, ref_stats, ref_feats, batch=batch, device=device,
                                  teacher=teacher_distance)
    rows = checkpoints.score_checkpoints(run_dir, score, num=n, seeds=seeds, batch=batch, device=device,
                                         log=click.echo)
    key = "fd_teacher" if teacher_distance is not None else "fd"
    label = f"{name} to the teacher's samples" if key == "fd_teacher" else name
    prefix = os.path.join(run_dir, f"scores-{feature_kind}")
    csv_path, json_path = checkpoints.write_scores(rows, prefix)
    png_path = checkpoints.plot_scores(rows, prefix + ".png", key=key, ylabel=label,
                                       title=f"One-step {label} of each checkpoint ({n} samples)")
    best = checkpoints.best_score(rows, key=key)
    click.echo(f"table -> {csv_path}, {json_path}; plot -> {png_path}")
    extra = f", RMSE {best['rmse_teacher']:.4f}" if key == "fd_teacher" else ""
    click.echo(f"best: step {best['step']}, weights {best['weights']} ({label} {max(best[key], 0.0):.4f}{extra})")


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
              help="Number of images (default: all of SOURCE; 50000 per checkpoint).")
@click.option("--seed-start", type=click.IntRange(min=0), default=0, show_default=True,
              help="Checkpoint SOURCE: image k uses seed seed_start + k.")
@click.option("--weights", default="auto", show_default=True,
              help="Checkpoint SOURCE: 'auto' (the slowest EMA that has forgotten the initial weights, else "
                   "'model'), 'model', 'ema' (the slowest EMA) or 'ema-<rate>'.")
@click.option("--all-checkpoints", is_flag=True,
              help="SOURCE is a run folder: score every checkpoint with the raw weights and every EMA; writes "
                   "SOURCE/scores-<features>.csv/.json/.png and names the best.")
@click.option("--batch", type=click.IntRange(min=1), default=250, show_default=True)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--kid", is_flag=True, help="Also report KID (needs reference images, not only statistics).")
@click.option("--save-stats", default=None, metavar="OUT.npz", help="Write SOURCE's (mu, sigma) to this .npz.")
@click.option("--vae", default=None, metavar="DIR", type=click.Path(exists=True, file_okay=False),
              help="Checkpoint SOURCE of a latent teacher (e.g. EDM2 img512): decode the samples with this local "
                   "diffusers AutoencoderKL folder (EDM2's latent scaling; a diffusers student's, e.g. a DiT's: the VAE's scaling_factor; pid_fast.eval.vae).")
@click.option("--teacher-samples", default=None, metavar="FILE.npz|DIR", type=click.Path(exists=True),
              help="The teacher's multi-step samples (`pid-fast sample --teacher`'s .npz: the student samples the "
                   "same seeds, hence the same noise and labels; or a folder / .npz of images paired by order). "
                   "Reports the distance to them first: FD between the two sets and per-sample RMSE (and LPIPS "
                   "with --lpips); --all-checkpoints picks the best by that FD.")
@click.option("--against-teacher", "teacher_source", default=None, metavar="CONFIG|FOLDER|FILE",
              type=click.Path(exists=True),
              help="As --teacher-samples, sampling the teacher here from seeds --seed-start.. (--num of them): a "
                   "trainer config (its 'teacher', e.g. RUN/config.json), a diffusers folder or a teacher file.")
@click.option("--teacher-sampler", type=click.Choice(["heun", "euler"]), default="heun", show_default=True,
              help="--against-teacher: the ODE solver.")
@click.option("--teacher-steps", type=click.IntRange(min=1), default=18, show_default=True,
              help="--against-teacher: sampling steps (Heun: 2 steps - 1 teacher calls).")
@click.option("--lpips", "lpips_weights", default=None, metavar="PATH", type=click.Path(exists=True, dir_okay=False),
              help="With a teacher's samples: also the mean per-sample LPIPS to them, with these local VGG16 "
                   "weights (pid_fast.eval.lpips; nothing is downloaded).")
@click.option("--lpips-lin", default=None, metavar="PATH", type=click.Path(exists=True, dir_okay=False),
              help="--lpips: the LPIPS linear heads (default: those of the installed lpips package).")
def fid(source, ref, feature_kind, inception_path, feature_net, num, seed_start, weights, all_checkpoints, batch,
        device, kid, save_stats, vae, teacher_samples, teacher_source, teacher_sampler, teacher_steps, lpips_weights,
        lpips_lin) -> None:
    """Frechet distance of SOURCE against reference statistics, computed with clean-fid.

    SOURCE is a folder of images, an .npz of images ('x' float NCHW in [-1, 1], or uint8
    'images'/'arr_0'), or a `pid-fast distill` checkpoint / run folder or an EDM snapshot .pkl
    trained with pid_fast's EDMPIDLoss (or its `pid-fast convert` .safetensors), whose one-step samples
    are generated and scored unquantised (the PID reference code's protocol: 50k samples,
    legacy_tensorflow Inception on float images). Nothing is downloaded: pass --inception.
    With --teacher-samples or --against-teacher, the distance to the teacher's samples from the
    same seeds comes first (FD between the sets, per-sample RMSE / LPIPS).
    Without --ref or a teacher, only --save-stats is done (e.g. to build reference statistics)."""
    device = pick_device(device)
    with_teacher = teacher_samples is not None or teacher_source is not None
    if teacher_samples is not None and teacher_source is not None:
        raise click.UsageError("--teacher-samples and --against-teacher exclude each other (give the samples, or "
                               "the teacher to sample)")
    if (lpips_weights is not None or lpips_lin is not None) and not with_teacher:
        raise click.UsageError("--lpips measures the distance to the teacher's samples: give --teacher-samples or "
                               "--against-teacher")
    if lpips_lin is not None and lpips_weights is None:
        raise click.UsageError("--lpips-lin needs --lpips (the VGG16 backbone weights)")
    if all_checkpoints:
        if not (os.path.isdir(source) and _is_checkpoint(source)):
            raise click.UsageError(f"--all-checkpoints: {source} is not a run folder with checkpoint-*.pt files")
        if save_stats:
            raise click.UsageError("--save-stats writes the statistics of one source; not with --all-checkpoints")
        if feature_kind == "inception" and ref is None and not with_teacher:
            raise click.UsageError("--all-checkpoints needs --ref (reference statistics or images) or a teacher's "
                                   "samples (--teacher-samples / --against-teacher)")
        if vae is not None:
            raise click.UsageError("--vae scores one checkpoint; not with --all-checkpoints")
    elif feature_kind == "inception" and ref is None and save_stats is None and not with_teacher:
        raise click.UsageError("give --ref (reference statistics or images), a teacher's samples (--teacher-samples / "
                               "--against-teacher) and/or --save-stats")
    needed = ["cleanfid"]
    if feature_kind == "digits" and ref is None:
        needed.append("sklearn")  # the 1797 digits
    if all_checkpoints:
        needed.append("matplotlib")  # the plot
    if os.path.isdir(source) and not _is_checkpoint(source):
        needed.append("PIL")  # a folder of images
    require("eval", *needed)
    if vae is not None:
        require("diffusers", "diffusers")  # the VAE

    extractor = _extractor(feature_kind, inception_path, feature_net, device)
    try:
        lpips = None
        if lpips_weights is not None:
            from pid_fast.eval.lpips import LPIPSNorm

            lpips = LPIPSNorm(lpips_weights, lin_weights=lpips_lin).to(device)
        teacher = _teacher_reference(teacher_samples, teacher_source, extractor=extractor, num=num,
                                     seed_start=seed_start, teacher_sampler=teacher_sampler,
                                     teacher_steps=teacher_steps, lpips=lpips, batch=batch, device=device)
        if all_checkpoints:
            _score_run(source, extractor=extractor, feature_kind=feature_kind, ref=ref, num=num,
                       seed_start=seed_start, batch=batch, device=device, kid=kid, teacher=teacher)
        else:
            _score_source(source, extractor=extractor, feature_kind=feature_kind, ref=ref, num=num,
                          seed_start=seed_start, weights=weights, batch=batch, device=device, kid=kid,
                          save_stats=save_stats, vae=vae, teacher=teacher)
    except _INPUT_ERRORS as exc:  # e.g. a broken .pt
        raise click.ClickException(str(exc)) from None


def register(group: click.Group) -> None:
    """Attach `fid` to a click group (e.g. pid_fast.cli.main)."""
    group.add_command(fid)
