"""pid_fast's weight files: safetensors holding the raw network weights, with the teacher
config as JSON metadata ('pid_fast.config'). Written atomically (atomic.atomic_write)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import torch

from pid_fast.io.atomic import atomic_write
from pid_fast.io.errors import CheckpointFormatError

__all__ = ["CONFIG_METADATA_KEY", "FORMAT_METADATA_KEY", "FORMAT_VERSION", "UNKNOWN_SOURCE_METADATA_KEY",
           "save_checkpoint", "load_checkpoint", "read_checkpoint_metadata"]

CONFIG_METADATA_KEY = "pid_fast.config"
FORMAT_METADATA_KEY = "pid_fast.format"
FORMAT_VERSION = "1"
# Written by `convert` when the caller accepted an EDM network source the importer does not
# know (see edm_sources.py): a JSON list of {'object', 'class_name', 'module_src_sha256'}.
UNKNOWN_SOURCE_METADATA_KEY = "pid_fast.unknown_source_accepted"


def _config_to_json(config: Mapping[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, allow_nan=False)


def _config_from_json(text: str) -> dict[str, Any]:
    def tuples(obj: Any) -> Any:
        if isinstance(obj, list):
            return tuple(tuples(v) for v in obj)
        if isinstance(obj, dict):
            return {k: tuples(v) for k, v in obj.items()}
        return obj

    return tuples(json.loads(text))


def save_checkpoint(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                    *, extra_metadata: Mapping[str, str] | None = None) -> None:
    """Write `state_dict` (contiguous, unshared copies) to a safetensors file with the
    config stored as JSON under metadata key 'pid_fast.config', atomically: a reader sees
    the old complete file or the new complete one. `extra_metadata` adds string entries."""
    from safetensors.torch import save

    if not isinstance(config, Mapping):
        raise TypeError(f"save_checkpoint: config must be a mapping, got {type(config).__name__}")
    tensors = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"save_checkpoint: state_dict[{k!r}] is a {type(v).__name__}, not a tensor")
        tensors[k] = v.detach().to("cpu").contiguous().clone()
    metadata = dict(extra_metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise TypeError("save_checkpoint: extra_metadata must map strings to strings")
    metadata.update({CONFIG_METADATA_KEY: _config_to_json(config), FORMAT_METADATA_KEY: FORMAT_VERSION})
    atomic_write(path, save(tensors, metadata=metadata))


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The raw string metadata of a safetensors file (no tensors are read)."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise FileNotFoundError(f"read_checkpoint_metadata: no such file: {os.fspath(path)!r}")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:  # safetensors raises its own SafetensorError on bad headers
        raise CheckpointFormatError(f"{os.fspath(path)}: not a readable safetensors file ({exc})") from None


def load_checkpoint(path: str | os.PathLike,
                    device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, config) from a file written by `save_checkpoint` / `pid-fast convert`."""
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"load_checkpoint: no such file: {os.fspath(path)!r}")
    metadata = read_checkpoint_metadata(path)
    try:
        state_dict = load_file(os.fspath(path), device=str(device))
    except Exception as exc:
        raise CheckpointFormatError(f"{os.fspath(path)}: not a readable safetensors file ({exc})") from None
    if CONFIG_METADATA_KEY not in metadata:
        raise CheckpointFormatError(f"{os.fspath(path)}: no {CONFIG_METADATA_KEY!r} metadata; "
                                    f"was it written by pid-fast convert?")
    return state_dict, _config_from_json(metadata[CONFIG_METADATA_KEY])
