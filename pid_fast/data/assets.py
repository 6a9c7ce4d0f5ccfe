"""The bundled files (the digits teacher and the digits classifier): where they live
(``pid_fast/assets/``), how they are written (safetensors, atomically) and the recipe each carries
in its metadata. Below both the evaluation (pid_fast.eval.digits) and the demo (pid_fast.demo)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from pid_fast.io.atomic import atomic_write
from pid_fast.io import read_checkpoint_metadata

__all__ = ["ASSETS_DIR", "DEFAULT_TEACHER", "DEFAULT_CONDITIONAL_TEACHER", "DEFAULT_FEATURES", "RECIPE_KEY", "CLASSIFIER_FORMAT", "checkpoint_recipe",
           "write_weights", "missing_file"]

ASSETS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
DEFAULT_TEACHER = os.path.join(ASSETS_DIR, "digits-teacher.safetensors")
DEFAULT_FEATURES = os.path.join(ASSETS_DIR, "digits-features.safetensors")
# class-conditional, trained with label dropout 0.1: it guides itself (`pid-fast demo --guidance W`)
DEFAULT_CONDITIONAL_TEACHER = os.path.join(ASSETS_DIR, "digits-teacher-cond.safetensors")

RECIPE_KEY = "pid_fast.recipe"  # safetensors metadata: how the file was made
CLASSIFIER_FORMAT = "pid_fast.digits_classifier/1"


def write_weights(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    """``state_dict`` as float32 safetensors with ``metadata``, written atomically (an ordinary
    data file: 0666 less the umask). For files that are not teachers (teachers are written by
    ``pid_fast.io.save_checkpoint``, which sets the teacher format itself)."""
    from safetensors.torch import save

    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    atomic_write(path, save(tensors, metadata=dict(metadata)))


def checkpoint_recipe(path: str | os.PathLike) -> dict[str, Any]:
    """How a teacher / classifier file of the demo was made: the command that reproduces it,
    its options and the numbers measured at the end of training."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"path: no such file: {path!r}")
    meta = read_checkpoint_metadata(path)
    if RECIPE_KEY not in meta:
        raise ValueError(f"path: {path!r} has no {RECIPE_KEY!r} metadata (not written by pid_fast.demo)")
    return json.loads(meta[RECIPE_KEY])


def missing_file(path: str, what: str, command: str) -> FileNotFoundError:
    """The error for an absent teacher / classifier file, naming the command that recreates it."""
    return FileNotFoundError(f"{what}: no such file: {path!r}. Recreate it with `{command}` "
                             f"(see the README), or pass the path of your own copy.")
