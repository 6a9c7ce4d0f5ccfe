"""Which backends this installation has, and the one place that picks one.

    "cpu" / "cuda"   the compiled kernels (csrc/), torch.ops.pid_fast
    "triton"         the Triton kernels (triton_kernels.py), torch.ops.pid_fast_triton
    "reference"      plain PyTorch (reference.py), always available

A backend that was not built or cannot run on the tensors' device is an error listing what is
available, never a silent fallback.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from pid_fast.ops import extension, library

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV_BACKEND = "PID_FAST_BACKEND"

_HAS_TRITON = importlib.util.find_spec("triton") is not None  # once: dynamo won't trace find_spec


def triton_available() -> bool:
    return _HAS_TRITON


def build_info() -> dict:
    """What this installation can run: the compiled CPU/CUDA kernels (with CUDA archs), Triton."""
    info = {"torch": torch.__version__, **_COMPILED}
    if triton_available():
        import triton

        info["triton"] = triton.__version__
    else:
        info["triton"] = None
    info["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return info


extension.load()
library.register_fakes("pid_fast")
library.register_autograd("pid_fast")  # the stable ABI has no C++ autograd Function
_COMPILED = extension.compiled_info()  # read once: torch.compile traces the backend choice


def available_backends(device: torch.device | str) -> list[str]:
    """Backends that can run on ``device`` in this installation."""
    device = torch.device(device)
    out = ["reference"]
    info = _COMPILED
    if device.type == "cpu":
        out.append("cpu")
        if triton_available() and os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    elif device.type == "cuda":
        if info["cuda"]:
            out.append("cuda")
        if triton_available():
            out.append("triton")
    return out


def resolve_backend(backend: Optional[str], device: torch.device | str) -> str:
    """The one place that picks a backend: the argument, else $PID_FAST_BACKEND, else by device
    (CPU tensors -> "cpu", CUDA tensors -> "cuda"). An unavailable choice is an error."""
    device = torch.device(device)
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get(ENV_BACKEND) or None, f"${ENV_BACKEND}"
    if backend is None:
        backend, source = {"cpu": "cpu", "cuda": "cuda"}.get(device.type), "default"
        if backend is None:
            raise ValueError(f"pid_fast has no kernels for device type {device.type!r}; "
                             "pass backend='reference' to use plain PyTorch")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r} (from {source})")
    avail = available_backends(device)
    if backend not in avail:
        why = ""
        if backend == "cuda" and device.type == "cuda":
            why = (" pid_fast was built without CUDA kernels (build_info()['cuda'] is False);"
                   " rebuild with a CUDA toolkit (CUDA_HOME, PID_FAST_CUDA=1) or use"
                   " backend='triton'.")
        elif backend == "triton" and not triton_available():
            why = " Triton is not installed."
        elif backend == "triton" and device.type == "cpu":
            why = " Triton runs on CPU tensors only under TRITON_INTERPRET=1."
        raise ValueError(f"backend {backend!r} (from {source}) is not available for "
                         f"{device.type} tensors; available: {avail}.{why}")
    return backend


def op_namespace(backend: str):
    """The torch.ops namespace of a fused backend ("cpu"/"cuda": the compiled library,
    "triton": the Triton kernels, registered on first use)."""
    if backend in ("cpu", "cuda"):
        return torch.ops.pid_fast
    from pid_fast.ops import triton_kernels  # noqa: F401  (registers torch.ops.pid_fast_triton)

    return torch.ops.pid_fast_triton
