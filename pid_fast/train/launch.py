"""``train_local_ddp``: ``train`` in several local processes (gloo on the CPU, NCCL on GPUs), a
stand-in for torchrun used by the tests. (Its own file: it imports the loop, which imports
distributed.py.)"""

from __future__ import annotations

import os
import socket
from typing import Any, Mapping

import torch

from pid_fast.checks import check_int
from pid_fast.train.loop import train

__all__ = ["train_local_ddp"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, config: dict, run_dir: str, resume: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(config, run_dir, resume=resume)


def train_local_ddp(config: Mapping[str, Any], run_dir: str | os.PathLike, world_size: int = 2,
                    resume: bool = False) -> None:
    """Run ``train`` in ``world_size`` local processes (gloo on the CPU, NCCL on GPUs): a
    stand-in for torchrun, used by the tests."""
    import torch.multiprocessing as mp

    check_int(world_size, "world_size", 1)
    mp.spawn(_ddp_worker, args=(world_size, _free_port(), dict(config), os.fspath(run_dir), resume),
             nprocs=world_size, join=True)
