"""Sharded checkpoints of ``parallel: fsdp`` runs: torch.distributed.checkpoint (DCP) folders.

    checkpoint-<step>.dcp/
        .metadata, __<rank>_0.distcp   DCP: model, optimizer, EMAs (and power EMAs), each rank its shards
        meta.pt                        format, step, config, world_size, machine, student metadata,
                                       the RNG state of every rank, grid sampler, grad scaler (rank 0)
        FINISHED                       written last, after every rank's shards and meta.pt

Atomicity: a folder without FINISHED is never listed (pid_fast.train.checkpoint.list_checkpoints),
so a kill at any moment leaves the previous finished checkpoint as the newest one; the next start
deletes unfinished folders. Resume loads the shards into the freshly sharded run (any number of
ranks: DCP reshards; bitwise continuation on the same number). ``read_sharded_checkpoint`` loads
the full weights into one process without a process group (DCP's own resharding), so
``pid-fast sample``, ``fid`` and ``export-diffusers`` read these folders as they read ``.pt`` files.
"""

from __future__ import annotations

import os
import shutil
import warnings
from typing import Any, Mapping

import torch
from torch import nn

from pid_fast.io.atomic import atomic_write
from pid_fast.train.checkpoint import (CHECKPOINT_FORMAT, FINISHED_MARKER, atomic_save, prune_checkpoints,
                                       sharded_checkpoint_path)

__all__ = ["META_FILE", "save_sharded_checkpoint", "read_sharded_meta", "load_sharded_state",
           "read_sharded_checkpoint"]

META_FILE = "meta.pt"
_WEIGHT_GROUPS = ("model", "ema", "power_ema")  # what a consolidated read returns (not the optimizer)


def _sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer, emas: Mapping[str, Any]) -> dict:
    """The state DCP saves and loads in place: DTensor shards of the model, its optimizer state
    keyed by parameter names, and each EMA group's {key: state dict}."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    for name, ema in emas.items():
        state[name] = ema.state_dict()
    return state


def save_sharded_checkpoint(run_dir: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            emas: Mapping[str, Any], meta: Mapping[str, Any], *, rank: int, keep: int,
                            barrier) -> str:
    """Every rank writes its shards of ``checkpoint-<step>.dcp``; then rank 0 writes meta.pt and
    the FINISHED marker, and prunes old checkpoints (keep). Collective. Returns the folder."""
    import torch.distributed.checkpoint as dcp

    path = sharded_checkpoint_path(run_dir, step)
    if rank == 0:
        shutil.rmtree(path, ignore_errors=True)  # an unfinished folder of a killed run at this step
        os.makedirs(path)
    barrier()
    dcp.save(_sharded_state(model, optimizer, emas), checkpoint_id=path)
    barrier()  # every rank's shards are on disk
    if rank == 0:
        atomic_save({"format": CHECKPOINT_FORMAT, "sharded": True, **meta}, os.path.join(path, META_FILE))
        atomic_write(os.path.join(path, FINISHED_MARKER), b"ok\n")
        prune_checkpoints(run_dir, keep)
    barrier()
    return path


def read_sharded_meta(path: str) -> dict:
    """meta.pt of a sharded checkpoint folder (ValueError if it is not one)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path}: not a sharded pid_fast checkpoint (no {META_FILE})")
    meta = torch.load(meta_path, map_location="cpu", weights_only=True)
    if not isinstance(meta, dict) or meta.get("format") != CHECKPOINT_FORMAT or not meta.get("sharded"):
        raise ValueError(f"{path}: not a sharded pid_fast checkpoint")
    return meta


def load_sharded_state(path: str, model: nn.Module, optimizer: torch.optim.Optimizer,
                       emas: Mapping[str, Any]) -> None:
    """Load the shards of ``path`` into the sharded ``model``, ``optimizer`` and ``emas``
    (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = _sharded_state(model, optimizer, emas)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    for name, ema in emas.items():
        ema.load_state_dict(state[name])


def read_sharded_checkpoint(path: str | os.PathLike) -> dict:
    """A sharded checkpoint folder as one process reads a ``.pt`` checkpoint: meta.pt's entries
    with the full weights 'model', 'ema' (and 'power_ema') on the CPU, consolidated by DCP from
    every rank's shards; the optimizer state is not read. No process group is needed."""
    import torch.distributed.checkpoint as dcp

    path = os.fspath(path)
    meta = read_sharded_meta(path)
    reader = dcp.FileSystemReader(path)
    metadata = reader.read_metadata()
    state: dict = {}
    for fqn, item in metadata.state_dict_metadata.items():
        keys = metadata.planner_data[fqn]  # the nested keys the flat name came from
        if keys[0] not in _WEIGHT_GROUPS or not hasattr(item, "size"):
            continue
        node = state
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = torch.empty(item.size, dtype=item.properties.dtype)
    with warnings.catch_warnings():  # (DCP's note that it loads in one process: that is the point here)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, storage_reader=reader, no_dist=True)
    return {**meta, "model": state.get("model", {}), "ema": state.get("ema", {}),
            **({"power_ema": state["power_ema"]} if "power_ema" in state else {})}
