"""Command line interface: `pid-fast <command>`.

`main` is a plain click group; commands register themselves with `@main.command()`.
"""

from __future__ import annotations

import click

__all__ = ["main"]


@click.group()
def main() -> None:
    """pid_fast: Physics Informed Distillation of diffusion models."""


def _register_commands() -> None:
    from pid_fast.cli import convert, distill, evaluate

    convert.register(main)  # convert
    distill.register(main)  # distill, sample
    evaluate.register(main)  # train-teacher, train-features, fid, demo


_register_commands()
