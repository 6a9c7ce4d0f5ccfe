"""Loads the compiled extension, which registers the ops in ``torch.ops.pid_fast``.

By default the extension built by setup.py (``pid_fast._C``) is imported; set
``PID_FAST_LIBRARY=/path/to/libpid_fast_C.so`` to load a library built with CMake instead.
A failed load raises: there is no silent fallback to slower code.

The library uses only the LibTorch Stable ABI of torch MIN_TORCH (csrc/, setup.py): one build
loads in every torch >= MIN_TORCH, whichever torch it was built against. An older torch is
refused here with that range before the library is loaded.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache

import torch

MIN_TORCH = (2, 10)  # the stable ABI target of csrc/ (setup.py and CMakeLists.txt read it)


def torch_target_version(min_torch: tuple = MIN_TORCH) -> str:
    """The -DTORCH_TARGET_VERSION value of MIN_TORCH: bytes [MAJ][MIN][PATCH][ABI TAG x5]."""
    return f"0x{min_torch[0]:02x}{min_torch[1]:02x}000000000000"


def torch_version(version: str) -> tuple:
    """(major, minor) of a torch version string such as "2.14.1+cu130" or "2.10.0a0"."""
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def check_torch_version(version: str = torch.__version__) -> None:
    """Raises ImportError naming the supported range when torch is older than MIN_TORCH."""
    if torch_version(version) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise ImportError(
            f"pid_fast's compiled kernels need torch >= {need} (they use the LibTorch Stable ABI "
            f"of torch {need}; one build serves every newer torch), but torch {version} is "
            f"installed. Upgrade torch: pip install 'torch>={need}'.")


@lru_cache(maxsize=None)
def load() -> None:
    check_torch_version()
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
