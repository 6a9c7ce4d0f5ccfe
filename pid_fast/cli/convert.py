"""`pid-fast convert`: an EDM or EDM2 network-snapshot .pkl to a pid_fast safetensors file."""

from __future__ import annotations

import os

import click


@click.command()
@click.argument("source", type=click.Path(exists=True, dir_okay=False))
@click.argument("destination", type=click.Path(dir_okay=False))
@click.option("--key", default="ema", show_default=True, help="Entry of the snapshot dict to convert.")
@click.option("--expect", default=None, metavar="NAME",
              help="Check the weights against a named network config (e.g. cifar10-ddpmpp).")
@click.option("--overwrite", is_flag=True, help="Replace DESTINATION if it exists.")
@click.option("--allow-unknown-source", is_flag=True,
              help="Accept a snapshot whose embedded network source is not a released EDM/EDM2 version "
                   "(its hash is recorded in DESTINATION's metadata).")
def convert(source: str, destination: str, key: str, expect: str | None, overwrite: bool,
            allow_unknown_source: bool) -> None:
    """Convert an EDM or EDM2 network-snapshot .pkl to a pid_fast safetensors file.

    The pickle is read by an allow-listing unpickler: the Python source embedded in the
    file is never executed. The converted network may reference nothing else; the snapshot's
    other entries (loss_fn, augment_pipe, ...) are not converted: classes the reader does not
    know become inert placeholders (nothing is run) and are listed as skipped.
    The output holds the raw network weights (no 'model.' / 'unet.' prefix, no map_augment, no
    EDM2 logvar head; EDM2's fp16 weights in fp32) and the architecture/preconditioning config
    (for EDM2 also its encoder: the latent scaling) as JSON metadata ('pid_fast.config').
    A network whose embedded source is not one of the released EDM / EDM2 versions is refused
    unless --allow-unknown-source is given.
    """
    from pid_fast.io import (CheckpointFormatError, ConfigMismatchError, UnknownSourceError, UnsafeCheckpointError,
                             convert as convert_checkpoint)
    from pid_fast.models.networks import NETWORK_CONFIGS

    if expect is not None and expect not in NETWORK_CONFIGS:
        raise click.BadParameter(f"unknown config {expect!r}; available: {', '.join(sorted(NETWORK_CONFIGS))}",
                                 param_hint="--expect")
    if os.path.exists(destination) and not overwrite:
        raise click.UsageError(f"{destination} exists; pass --overwrite to replace it")
    try:
        ckpt = convert_checkpoint(source, destination, key=key, expect=expect,
                                  allow_unknown_source=allow_unknown_source)
    except UnsafeCheckpointError as exc:
        raise click.ClickException(f"unsafe checkpoint: {exc}") from None
    except (CheckpointFormatError, ConfigMismatchError, UnknownSourceError) as exc:
        raise click.ClickException(str(exc)) from None
    network = ckpt.config["network"]
    params = sum(v.numel() for v in ckpt.state_dict.values())
    click.echo(f"{source} [{key}] -> {destination}")
    click.echo(f"  {network['model_type']} with {ckpt.config['precond']} preconditioning, "
               f"{len(ckpt.state_dict)} tensors, {params:,} values"
               + (f", dropped {len(ckpt.dropped_keys)} tensor(s) that D does not use "
                  f"({', '.join(sorted({k.split('.')[-2] for k in ckpt.dropped_keys}))})"
                  if ckpt.dropped_keys else ""))
    encoder = ckpt.config.get("encoder")
    if encoder and encoder["kind"] == "stability-vae":
        click.echo(f"  latent teacher: decode samples with the VAE {encoder['vae_name']!r} (a local copy; "
                   f"latent scale {encoder['scale']}, bias {encoder['bias']})")
    for entry in ckpt.skipped:  # the snapshot's other entries (e.g. a trainer's loss_fn): not converted
        click.echo(f"  skipped {entry}")
    if ckpt.loss_settings:
        click.echo(f"  recorded the PID loss's grid for one-step sampling: {ckpt.loss_settings}")
    for accepted in ckpt.unknown_sources:
        click.echo(f"  accepted an unknown network source for {accepted['object']} ({accepted['class_name']}): "
                   f"sha256 {accepted['module_src_sha256']} (recorded in the output's metadata)")


def register(group: click.Group) -> None:
    group.add_command(convert)
