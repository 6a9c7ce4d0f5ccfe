"""Weights chosen after training. `pid-fast power-ema`: EDM2's post-hoc EMA. From the power-EMA snapshots a run stored
(config power_ema.sigma_rels and power_ema.snapshot_every), rebuild the EMA of any length
(sigma_rel) at any snapshot step, as checkpoints that `pid-fast sample` and
`pid-fast fid --all-checkpoints` read (their 'model' weights are the reconstruction).

    pid-fast power-ema runs/c10 runs/c10-posthoc --sigma-rel 0.05 --sigma-rel 0.08 --sigma-rel 0.12
    pid-fast fid runs/c10-posthoc/sigma_rel-0.0800 --all-checkpoints --ref cifar10.npz

`pid-fast teacher-share`: a checkpoint's weights blended with the run's initial (for PID, the
teacher's) weights, (1 - s) w + s w_init, one checkpoint per share (train/teacher_share.py).

    pid-fast teacher-share runs/c10 runs/c10-shares --share 0.1 --share 0.2
    pid-fast fid runs/c10-shares/share-0.2000 --all-checkpoints --ref cifar10.npz
"""

from __future__ import annotations

import os

import click

__all__ = ["power_ema", "teacher_share"]


@click.command("power-ema")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--sigma-rel", "sigma_rels", type=float, multiple=True, required=True,
              help="EMA length to rebuild, as EDM2's relative standard deviation (e.g. 0.05; repeat the option for "
                   "several).")
@click.option("--step", "steps", type=int, multiple=True,
              help="Step(s) to rebuild at (default: every snapshot's step).")
def power_ema(run_dir, out_dir, sigma_rels, steps) -> None:
    """Rebuild power EMAs of RUN_DIR's snapshots into OUT_DIR/sigma_rel-<s>/checkpoint-<step>.pt."""
    from pid_fast.train.power_ema import sigma_rel_to_gamma, write_reconstructions

    try:
        for s in sigma_rels:
            sigma_rel_to_gamma(s)  # validates
        paths = write_reconstructions(run_dir, sigma_rels, out_dir, steps=list(steps) or None)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(paths)} reconstructed checkpoint(s) in {out_dir} "
               f"(sigma_rel {', '.join(f'{s:g}' for s in sigma_rels)})")


@click.command("teacher-share")
@click.argument("checkpoint", type=click.Path(exists=True))
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--share", "shares", type=float, multiple=True, required=True,
              help="Share of the initial weights, in [0, 1) (repeat the option for several).")
@click.option("--weights", default="model", show_default=True, help="'model', 'ema' or 'ema-<rate>'.")
def teacher_share(checkpoint, out_dir, shares, weights) -> None:
    """Blend CHECKPOINT's weights (a file, or a run folder's newest) with the run's initial
    weights into OUT_DIR/share-<s>/checkpoint-<step>.pt."""
    from pid_fast.train import load_latest_checkpoint
    from pid_fast.train.teacher_share import check_share, write_teacher_shares

    try:
        for s in shares:
            check_share(s)
        if os.path.isdir(checkpoint):
            found = load_latest_checkpoint(checkpoint)
            if found is None:
                raise FileNotFoundError(f"checkpoint: no checkpoint-*.pt in folder {checkpoint!r}")
            checkpoint = found[0]
        paths = write_teacher_shares(checkpoint, shares, out_dir, weights=weights)
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{len(paths)} blended checkpoint(s) of {checkpoint} ({weights}) in {out_dir} "
               f"(share {', '.join(f'{s:g}' for s in shares)})")
