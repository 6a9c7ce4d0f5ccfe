"""Loads the compiled extension, which registers the ops in ``torch.ops.pid_fast``.

By default the extension built by setup.py (``pid_fast._C``) is imported; set
``PID_FAST_LIBRARY=/path/to/libpid_fast_C.so`` to load a library built with CMake instead.
A failed load raises: there is no silent fallback to slower code.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch


@lru_cache(maxsize=None)
def load() -> None:
    path = os.environ.get("PID_FAST_LIBRARY")
    if path:
        if not os.path.isfile(path):
            raise ImportError(f"PID_FAST_LIBRARY={path!r} does not exist")
        torch.ops.load_library(path)
        return
    try:
        from pid_fast import _C  # noqa: F401  (import runs the op registrations)
    except ImportError as e:
        raise ImportError(
            "pid_fast's compiled extension (pid_fast._C) could not be imported: "
            f"{e}. Build it with `pip install --no-build-isolation -e .` against the torch "
            "you use (see README.md).") from e


@lru_cache(maxsize=None)
def _info_json() -> str:
    load()
    return torch.ops.pid_fast.build_info()


def compiled_info() -> dict:
    """What the loaded library was compiled with: {"cpu": True, "cuda": bool, "cuda_archs"}."""
    return json.loads(_info_json())
