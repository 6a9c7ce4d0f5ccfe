"""`pid-fast fid`: Frechet distance (and KID) of images, a checkpoint, or every checkpoint of a
run, computed with clean-fid. ``register(group)`` attaches it to a click group (the `pid-fast`
group of pid_fast/cli/__init__.py).

    pid-fast fid runs/c10 --ref cifar10-32x32.npz --inception inception-2015-12-05.pt --num 50000
    pid-fast fid samples/ --features digits --kid
    pid-fast fid pid-demo/run --features digits --all-checkpoints --num 5000
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


def _score_source(source, *, extractor, feature_kind, ref, num, seed_start, weights, batch, device, kid,
                  save_stats, vae=None) -> None:
    """The single-source path: SOURCE's features, then its distance to the reference."""
    from pid_fast.eval import metrics

    if _is_checkpoint(source):
        from pid_fast.eval.checkpoints import load_scored_student
        from pid_fast.train import generate

        net, meta, used = load_scored_student(source, weights=weights, device=device)
        n = num or 50000
        how = f"{used}, picked by the 'auto' rule" if weights == "auto" else used
        click.echo(f"generating {n} one-step samples from {meta['path']} (step {meta['step']}, weights {how}) ...")
        decode = None
        if vae is not None:  # a latent student: its samples go through the VAE (pid_fast.eval.vae)
            from pid_fast.eval.vae import LatentDecoder
            decode = LatentDecoder.from_path(vae, device=device)
        images, _ = generate(net, meta, range(seed_start, seed_start + n), batch=batch, device=device, decode=decode)
    else:
        images = metrics.load_images(source, num=num)
    feats = metrics.features_of(extractor, images, batch=batch, device=device)
    click.echo(f"{source}: {feats.shape[0]} images, {feats.shape[1]}-d {feature_kind} features")
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


def _score_run(run_dir, *, extractor, feature_kind, ref, num, seed_start, batch, device, kid) -> None:
    """--all-checkpoints: every checkpoint x every weight set, a table, a plot and the best."""
    from pid_fast.eval import checkpoints

    ref_name, ref_stats, ref_feats = _reference(ref, feature_kind, extractor, batch, device)
    if kid and ref_feats is None:
        raise click.UsageError("--kid needs reference images (KID is not computable from mu/sigma)")
    name = "FID" if feature_kind == "inception" else "digits FD"
    n = num or 50000
    click.echo(f"scoring every checkpoint of {run_dir} with the raw weights and every EMA: {n} one-step samples "
               f"each (seeds {seed_start}..{seed_start + n - 1}), {name} vs {ref_name}"
               + (" and KID" if ref_feats is not None else ""))
    score = checkpoints.fd_scorer(extractor, ref_stats, ref_feats, batch=batch, device=device)
    rows = checkpoints.score_checkpoints(run_dir, score, num=n, seed_start=seed_start, batch=batch, device=device,
                                         log=click.echo)
    prefix = os.path.join(run_dir, f"scores-{feature_kind}")
    csv_path, json_path = checkpoints.write_scores(rows, prefix)
    png_path = checkpoints.plot_scores(rows, prefix + ".png", ylabel=name,
                                       title=f"One-step {name} of each checkpoint ({n} samples)")
    best = checkpoints.best_score(rows)
    click.echo(f"table -> {csv_path}, {json_path}; plot -> {png_path}")
    click.echo(f"best: step {best['step']}, weights {best['weights']} ({name} {best['fd']:.4f})")


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
                   "diffusers AutoencoderKL folder (EDM2's latent scaling; pid_fast.eval.vae).")
def fid(source, ref, feature_kind, inception_path, feature_net, num, seed_start, weights, all_checkpoints, batch,
        device, kid, save_stats, vae) -> None:
    """Frechet distance of SOURCE against reference statistics, computed with clean-fid.

    SOURCE is a folder of images, an .npz of images ('x' float NCHW in [-1, 1], or uint8
    'images'/'arr_0'), or a `pid-fast distill` checkpoint / run folder or an EDM snapshot .pkl
    trained with pid_fast's EDMPIDLoss (or its `pid-fast convert` .safetensors), whose one-step samples
    are generated and scored unquantised (the PID reference code's protocol: 50k samples,
    legacy_tensorflow Inception on float images). Nothing is downloaded: pass --inception.
    Without --ref, only --save-stats is done (e.g. to build reference statistics)."""
    device = pick_device(device)
    if all_checkpoints:
        if not (os.path.isdir(source) and _is_checkpoint(source)):
            raise click.UsageError(f"--all-checkpoints: {source} is not a run folder with checkpoint-*.pt files")
        if save_stats:
            raise click.UsageError("--save-stats writes the statistics of one source; not with --all-checkpoints")
        if feature_kind == "inception" and ref is None:
            raise click.UsageError("--all-checkpoints needs --ref (reference statistics or images)")
        if vae is not None:
            raise click.UsageError("--vae scores one checkpoint; not with --all-checkpoints")
    elif feature_kind == "inception" and ref is None and save_stats is None:
        raise click.UsageError("give --ref (reference statistics or images) and/or --save-stats")
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
        if all_checkpoints:
            _score_run(source, extractor=extractor, feature_kind=feature_kind, ref=ref, num=num,
                       seed_start=seed_start, batch=batch, device=device, kid=kid)
        else:
            _score_source(source, extractor=extractor, feature_kind=feature_kind, ref=ref, num=num,
                          seed_start=seed_start, weights=weights, batch=batch, device=device, kid=kid,
                          save_stats=save_stats, vae=vae)
    except _INPUT_ERRORS as exc:  # e.g. a broken .pt
        raise click.ClickException(str(exc)) from None


def register(group: click.Group) -> None:
    """Attach `fid` to a click group (e.g. pid_fast.cli.main)."""
    group.add_command(fid)
