"""Helpers several `pid-fast` commands share: the device choice, torch threads, the overwrite
check and the command line recorded in a file's metadata."""

from __future__ import annotations

import os
import shlex

import click

__all__ = ["pick_device", "set_threads", "check_out", "command_line"]


def pick_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; 'cuda' without CUDA is a usage error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available", param_hint="--device")
    return device


def set_threads(threads) -> None:
    """torch CPU threads, when given (None: leave torch's default)."""
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


def check_out(out: str, overwrite: bool) -> None:
    """Refuse to replace an existing output file unless --overwrite was passed."""
    if os.path.exists(out) and not overwrite:
        raise click.UsageError(f"{out} exists; pass --overwrite to replace it")


def command_line(name: str, options: list[tuple[str, object]]) -> str:
    """The shell command `pid-fast NAME --flag value ...`, quoted, e.g. for a file's metadata."""
    parts = ["pid-fast", name]
    for flag, value in options:
        parts += [flag] if value is None else [flag, str(value)]  # (None: a flag without a value)
    return " ".join(shlex.quote(p) for p in parts)
