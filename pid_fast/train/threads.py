"""How many CPU threads to train with: timed, since OpenMP's spinning threads can make 2 threads
many times slower than 1 on a busy machine."""

from __future__ import annotations

import copy
import os
import time

import torch

__all__ = ["pick_threads"]


def pick_threads(net: torch.nn.Module, shape, candidates=None, repeats: int = 2) -> tuple[int, dict[int, float]]:
    """The faster of 1 thread and all cores for a forward+backward of ``net`` on a batch of
    ``shape`` (best of ``repeats`` after a warm-up), and the timings. On a busy machine OpenMP's
    spinning threads can make 2 threads many times slower than 1; on an idle one they help."""
    if candidates is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        candidates = sorted({1, cores})
    net = copy.deepcopy(net).train().requires_grad_(True)
    x, c = torch.randn(shape), torch.zeros(shape[0])
    before = torch.get_num_threads()
    timings = {}
    try:
        for n in candidates:
            torch.set_num_threads(n)
            best = float("inf")
            for k in range(repeats + 1):
                t0 = time.perf_counter()
                net(x, c).square().mean().backward()
                if k:  # the first call warms up
                    best = min(best, time.perf_counter() - t0)
            timings[n] = best
    finally:
        torch.set_num_threads(before)
    return min(timings, key=timings.get), timings
