"""``train_local_ddp``: ``train`` in several local processes (gloo on the CPU, NCCL on GPUs), a
stand-in for torchrun used by the tests. (Its own file: it imports the loop, which imports
distributed.py.)"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping, Sequence

import torch

from pid_fast.checks import check_int
from pid_fast.train.loop import train

__all__ = ["train_local_ddp", "train_local_runs"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, ports: list, runs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    for port, (config, run_dir, resume) in zip(ports, runs):  # each run starts and ends its own process group
        os.environ["MASTER_PORT"] = str(port)
        train(config, run_dir, resume=resume)


def train_local_ddp(config: Mapping[str, Any], run_dir: str | os.PathLike, world_size: int = 2,
                    resume: bool = False) -> None:
    """Run ``train`` in ``world_size`` local processes (gloo on the CPU, NCCL on GPUs): a
    stand-in for torchrun, used by the tests."""
    train_local_runs([(config, run_dir, resume)], world_size)


def train_local_runs(runs: Sequence[tuple[Mapping[str, Any], str | os.PathLike, bool]], world_size: int = 2) -> None:
    """Several (config, run_dir, resume) runs one after the other in the same ``world_size``
    local processes (one start-up for all; tests and benchmarks)."""
    import torch.multiprocessing as mp

    check_int(world_size, "world_size", 1)
    runs = [(dict(config), os.fspath(run_dir), bool(resume)) for config, run_dir, resume in runs]
    mp.spawn(_ddp_worker, args=(world_size, [_free_port() for _ in runs], runs), nprocs=world_size, join=True)
