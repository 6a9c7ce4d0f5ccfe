"""Training checkpoints and the RNG states they carry.

A checkpoint is ``checkpoint-<step>.pt`` in the run folder: a dict with format CHECKPOINT_FORMAT,
step, config, world_size, student (sampling metadata), model, ema, optimizer and rng (one RNG
state per rank). It is written to a temporary file, fsync'ed and renamed over the final name
(pid_fast.io.atomic), so a kill at any moment leaves every ``checkpoint-*.pt`` complete; resume
picks the newest one that loads.

Under ``parallel: fsdp`` a checkpoint is a folder ``checkpoint-<step>.dcp`` of sharded state
(torch.distributed.checkpoint; pid_fast.train.sharded_checkpoint) whose file FINISHED is written
last: a folder without it is never listed, resumed from or sampled.
"""

from __future__ import annotations

import contextlib
import glob
import os
import random
import re
import shutil
import warnings
from typing import Any, Mapping, Optional

import numpy as np
import torch

from pid_fast.io.atomic import atomic_write

__all__ = ["CHECKPOINT_FORMAT", "SHARDED_SUFFIX", "FINISHED_MARKER", "is_sharded_checkpoint", "atomic_save",
           "list_checkpoints", "read_checkpoint", "load_latest_checkpoint", "checkpoint_path",
           "sharded_checkpoint_path", "save_checkpoint", "prune_checkpoints", "remove_stale_temporaries",
           "rng_state", "set_rng_state", "seed_rngs"]

CHECKPOINT_FORMAT = "pid_fast.train/1"
SHARDED_SUFFIX = ".dcp"         # checkpoint-<step>.dcp/: a sharded (DCP) checkpoint folder
FINISHED_MARKER = "FINISHED"    # written last into a sharded checkpoint folder


def is_sharded_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished sharded checkpoint folder (``checkpoint-<step>.dcp`` with
    its FINISHED marker)."""
    path = os.fspath(path)
    return path.rstrip(os.sep).endswith(SHARDED_SUFFIX) and os.path.isfile(os.path.join(path, FINISHED_MARKER))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save to a temporary file in the same folder, fsync, then rename over ``path``:
    ``path`` is either the old complete file or the new complete file, never a partial one."""
    atomic_write(path, lambda f: torch.save(obj, f))


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:09d}.pt")


def numbered_files(run_dir: str | os.PathLike, prefix: str) -> list[tuple[int, str]]:
    """(step, path) of the files ``<prefix>-<step>.pt`` in ``run_dir``, unordered (temporary
    files excluded)."""
    name = re.compile(re.escape(prefix) + r"-(\d+)\.pt$")
    found = []
    for path in glob.glob(os.path.join(os.fspath(run_dir), f"{prefix}-*.pt")):
        match = name.search(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return found


def sharded_checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(run_dir, f"checkpoint-{step:09d}{SHARDED_SUFFIX}")


def _sharded_folders(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of every ``checkpoint-<step>.dcp`` folder, finished or not."""
    name = re.compile(r"checkpoint-(\d+)" + re.escape(SHARDED_SUFFIX) + "$")
    found = []
    for path in glob.glob(os.path.join(os.fspath(run_dir), f"checkpoint-*{SHARDED_SUFFIX}")):
        match = name.search(os.path.basename(path))
        if match and os.path.isdir(path):
            found.append((int(match.group(1)), path))
    return found


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, str]]:
    """(step, path) of the checkpoints in ``run_dir``, newest first: ``checkpoint-<step>.pt`` files
    (temporary files excluded) and finished sharded folders ``checkpoint-<step>.dcp``."""
    sharded = [(step, path) for step, path in _sharded_folders(run_dir) if is_sharded_checkpoint(path)]
    return sorted(numbered_files(run_dir, "checkpoint") + sharded, reverse=True)


def read_checkpoint(path: str) -> dict:
    """The state of one training checkpoint file (ValueError if it is not one); of a sharded
    folder, its full (consolidated) weights and EMAs with the run's metadata, without the
    optimizer (pid_fast.train.sharded_checkpoint.read_sharded_checkpoint)."""
    if os.path.isdir(path):
        from pid_fast.train.sharded_checkpoint import read_sharded_checkpoint

        return read_sharded_checkpoint(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a pid_fast training checkpoint")
    return state


def load_latest_checkpoint(run_dir: str | os.PathLike, read=None) -> Optional[tuple[str, dict]]:
    """(path, state) of the newest checkpoint of ``run_dir`` that loads, or None. ``run_dir`` may
    also be one sharded checkpoint folder. ``read``: how a path is read (default read_checkpoint)."""
    read = read or read_checkpoint
    candidates = ([(0, os.fspath(run_dir))] if is_sharded_checkpoint(run_dir) else list_checkpoints(run_dir))
    for _, path in candidates:
        try:
            return path, read(path)
        except Exception as exc:  # a damaged file (e.g. disk full): fall back to the previous one
            warnings.warn(f"skipping unreadable checkpoint {path}: {exc}")
    return None


def save_checkpoint(run_dir: str, step: int, state: Mapping[str, Any], keep: int) -> str:
    """Write ``state`` as the checkpoint of ``step`` (atomically), then delete all but the
    ``keep`` newest checkpoints (keep 0: delete none). Returns the checkpoint's path."""
    path = checkpoint_path(run_dir, step)
    atomic_save(state, path)
    prune_checkpoints(run_dir, keep)
    return path


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (files and sharded folders; keep 0: none)."""
    for _, old in list_checkpoints(run_dir)[keep:] if keep else []:
        with contextlib.suppress(OSError):
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def remove_stale_temporaries(run_dir: str) -> None:
    """Delete the temporary files and unfinished sharded folders a killed run left behind (never
    a valid checkpoint)."""
    for stale in glob.glob(os.path.join(run_dir, "checkpoint-*.pt.tmp-*")):
        with contextlib.suppress(OSError):
            os.remove(stale)
    for _, folder in _sharded_folders(run_dir):
        if not is_sharded_checkpoint(folder):
            shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# RNG states (torch, Python, NumPy and CUDA), so that a resumed run continues every stream


def rng_state(device: torch.device) -> dict:
    """This process's RNG states, as tensors and plain values (loadable with weights_only)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Mapping[str, Any], device: torch.device) -> None:
    """Restore what ``rng_state`` recorded."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_rngs(seed: int) -> None:
    """Seed torch's, NumPy's and Python's global RNGs (a fresh run: seed = config seed + rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)
