"""The process group and this process's device, and the few collectives the loop uses.

Under torchrun (WORLD_SIZE > 1 in the environment) ``process_group`` initialises the group
(NCCL on GPUs, gloo on the CPU) and tears it down at the end; with one process every helper here
is a no-op, so the loop reads the same either way.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "process_group", "wrap_ddp", "grad_sync", "barrier", "all_gather_objects",
           "all_reduce_sum", "all_reduce_min"]


@dataclass(frozen=True)
class DistContext:
    """Where this process trains: its rank among world_size processes, and its device."""

    rank: int
    world_size: int
    device: torch.device


@contextlib.contextmanager
def process_group(device_cfg: str, single_process_group: bool = False) -> Iterator[DistContext]:
    """This process's DistContext (torchrun sets the env); a process group initialised here is
    destroyed on exit. ``single_process_group``: without torchrun, a group of this one process
    (FSDP's device mesh needs one)."""
    initialized_here = False
    use_cuda = device_cfg != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if use_cuda else "gloo")
        initialized_here = True
    elif not dist.is_initialized() and single_process_group:
        dist.init_process_group("nccl" if use_cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        initialized_here = True
    try:
        yield _context(device_cfg)
    finally:
        if initialized_here:
            dist.destroy_process_group()


def _context(device_cfg: str) -> DistContext:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if device_cfg == "cuda" and not torch.cuda.is_available():
        raise ValueError("config['device'] is 'cuda' but CUDA is not available")
    if device_cfg != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistContext(rank, world_size, device)


def wrap_ddp(net: nn.Module, ctx: DistContext) -> nn.Module:
    """``net`` in DistributedDataParallel when there are several processes, else ``net``."""
    if ctx.world_size == 1:
        return net
    return nn.parallel.DistributedDataParallel(net, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)


def grad_sync(model: nn.Module, ctx: DistContext, sync: bool):
    """The context of one backward: DDP's no_sync() when ``sync`` is false (a non-final
    accumulation round: gradients are all-reduced once, on the last round); for an FSDP2 module,
    set_requires_gradient_sync(False) likewise (unsharded gradients accumulate locally and are
    reduce-scattered on the last round)."""
    if hasattr(model, "set_requires_gradient_sync"):
        return _fsdp_sync(model, sync)
    if ctx.world_size > 1 and not sync:
        return model.no_sync()
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def all_gather_objects(obj: Any, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if ctx.world_size == 1:
        return [obj]
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


def all_reduce_sum(tensor: torch.Tensor, ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.all_reduce(tensor)


def all_reduce_min(tensor: torch.Tensor, ctx: DistContext) -> None:
    if ctx.world_size > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
