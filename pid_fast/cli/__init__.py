"""Command line interface: `pid-fast <command>` (entry point ``pid_fast.cli:main``;
``python -m pid_fast.cli`` runs the same group).

- ``__init__.py``: ``main``, the click group; each command module attaches its commands;
- ``__main__.py``: ``python -m pid_fast.cli`` (e.g. under torchrun);
- ``distill.py``: ``distill`` (PID training), ``sample`` (one-step samples of a checkpoint),
  ``power-ema`` (an EMA of any length rebuilt from power-EMA snapshots, train/power_ema.py) and
  ``export-diffusers`` (a diffusers student as a save_pretrained folder);
- ``evaluate.py``: ``fid`` (FD / KID of images, a checkpoint, or every checkpoint of a run);
- ``text.py``: ``clip-score`` and ``text-eval`` (text-to-image students: CLIP score, RMSE to the teacher);
- ``demo.py``: ``demo`` (the offline digits demo), ``train-teacher`` and ``train-features``
  (the demo's bundled files);
- ``convert.py``: ``convert`` (an EDM .pkl to a pid_fast safetensors file);
- ``common.py``: helpers several commands share (device, threads, overwrite check, the
  command line recorded in a file);
- ``requirements.py``: ``require``: a command's optional packages, checked before any work.
"""

from __future__ import annotations

import click

__all__ = ["main"]


@click.group()
def main() -> None:
    """pid_fast: Physics Informed Distillation of diffusion models."""


def _register_commands() -> None:
    from pid_fast.cli import convert, demo, distill, evaluate, text

    convert.register(main)  # convert
    distill.register(main)  # distill, sample, power-ema, teacher-share, export-diffusers
    evaluate.register(main)  # fid
    demo.register(main)  # demo, train-teacher, train-features
    text.register(main)  # clip-score, text-eval


_register_commands()
