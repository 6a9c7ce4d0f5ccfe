"""How many CPU threads to train with: timed, since OpenMP's spinning threads can make 2 threads
many times slower than 1 on a busy machine.

- ``pick_threads``: the faster of 1 thread and all cores for a forward+backward of a network;
- ``pick_threads_for_config``: the same for the student a trainer config builds (what
  ``pid-fast distill`` does on the CPU when --threads is not given).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Mapping

import torch

from pid_fast.train.builders import build_student, build_teacher

__all__ = ["pick_threads", "pick_threads_for_config"]


def pick_threads(net: torch.nn.Module, shape, candidates=None, repeats: int = 2,
                 label_dim: int = 0) -> tuple[int, dict[int, float]]:
    """The faster of 1 thread and all cores for a forward+backward of ``net`` on a batch of
    ``shape`` (class labels one-hot of width ``label_dim`` when it is conditional; best of
    ``repeats`` after a warm-up), and the timings. On a busy machine OpenMP's
    spinning threads can make 2 threads many times slower than 1; on an idle one they help.
    The global RNG and the thread count are left as they were."""
    if candidates is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        candidates = sorted({1, cores})
    net = copy.deepcopy(net).train().requires_grad_(True)
    with torch.random.fork_rng(devices=[]):
        x, c = torch.randn(shape), torch.zeros(shape[0])
    labels = torch.nn.functional.one_hot(torch.zeros(shape[0], dtype=torch.long), label_dim).float() if label_dim else None
    before = torch.get_num_threads()
    timings = {}
    try:
        for n in candidates:
            torch.set_num_threads(n)
            best = float("inf")
            for k in range(repeats + 1):
                t0 = time.perf_counter()
                (net(x, c) if labels is None else net(x, c, labels)).square().mean().backward()
                if k:  # the first call warms up
                    best = min(best, time.perf_counter() - t0)
            timings[n] = best
    finally:
        torch.set_num_threads(before)
    return min(timings, key=timings.get), timings


def pick_threads_for_config(config: Mapping[str, Any], max_batch: int = 64) -> tuple[int, dict[int, float]]:
    """``pick_threads`` on the student network that ``config`` (a resolved trainer config)
    builds, on the CPU, with the batch one training step feeds it: 2 x the per-process batch
    (the t and t2 evaluations in one call), at most ``max_batch`` images so the timing stays a
    few forward+backward passes. Builds the teacher as the trainer does, so a missing teacher
    file raises FileNotFoundError here, before any training."""
    cpu = torch.device("cpu")
    teacher, teacher_net = build_teacher(config["teacher"], cpu)
    student, net_cfg = build_student(config["student"], teacher, teacher_net, cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = max(1, config["batch_size"] // (world * config["accum"]))
    resolution = int(net_cfg["img_resolution"])
    shape = (min(2 * per_process, max_batch), int(net_cfg["in_channels"]), resolution, resolution)
    return pick_threads(student, shape, label_dim=int(net_cfg.get("label_dim") or 0))
