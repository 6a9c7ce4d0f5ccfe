"""How many CPU threads to train with.

The thread count is part of a run's numbers: CPU kernels (convolution gradients, sums) split
their reductions over the threads, so another count rounds differently and a resumed run is
no longer the bitwise continuation of the run before it. Hence one rule, ``choose_threads``,
in this order:

1. the count asked for (``pid-fast distill --threads N``);
2. the count of the run being resumed (checkpoint['machine']['cpu_threads'], ``recorded_threads``);
3. the count the user pinned with the ``OMP_NUM_THREADS`` environment variable (torch applies
   it at start-up; the variable is read only to know that the user set it);
4. otherwise timed: OpenMP's spinning threads can make 2 threads many times slower than 1 on a
   busy machine, so ``pick_threads`` takes the faster of 1 thread and all cores for a
   forward+backward of the student (``pick_threads_for_config``).

The trainer records the count in every checkpoint and warns once when a resume runs with
another one (pid_fast.train.loop).
"""

from __future__ import annotations

import copy
import os
import time
from typing import Any, Callable, Mapping, Optional

import torch

from pid_fast.train.builders import build_student, build_teacher
from pid_fast.train.checkpoint import list_checkpoints

__all__ = ["pick_threads", "pick_threads_for_config", "choose_threads", "recorded_threads", "THREADS_ENV"]

THREADS_ENV = "OMP_NUM_THREADS"


def choose_threads(requested: Optional[int], recorded: Optional[int], environ: Mapping[str, str],
                   pick: Callable[[], tuple[int, dict[int, float]]]) -> tuple[int, str]:
    """(threads, why) by the module's rule: ``requested`` (--threads), else ``recorded`` (the
    resumed run's), else torch's count when ``environ`` pins OMP_NUM_THREADS, else ``pick()``
    (timed; called only then)."""
    if requested is not None:
        if recorded is not None and requested != recorded:
            return requested, f"--threads; the resumed run used {recorded}: not a bitwise continuation"
        return requested, "--threads"
    if recorded is not None:
        return recorded, "the count of the resumed run, recorded in its checkpoint"
    if environ.get(THREADS_ENV, "").strip():
        return torch.get_num_threads(), f"{THREADS_ENV}={environ[THREADS_ENV].strip()}"
    threads, timings = pick()
    detail = ", ".join(f"{n} thread{'s' * (n > 1)} {s * 1e3:.0f} ms" for n, s in timings.items())
    return threads, (f"timed: a training-sized forward+backward of the student: {detail}; "
                     f"--threads N or {THREADS_ENV}=N to choose")


def recorded_threads(run_dir: str | os.PathLike) -> Optional[int]:
    """The CPU thread count recorded in the newest readable checkpoint of ``run_dir`` (the one
    a resume continues), or None (no checkpoint, or a run that did not train on the CPU).
    Memory-maps the file: the weights are not read."""
    for _, path in list_checkpoints(run_dir):
        try:  # (a sharded checkpoint folder: its meta.pt)
            state = torch.load(os.path.join(path, "meta.pt") if os.path.isdir(path) else path, map_location="cpu",
                               weights_only=True, mmap=True)
        except Exception:  # a damaged file: resume skips it too (load_latest_checkpoint)
            continue
        machine = state.get("machine") if isinstance(state, dict) else None
        threads = machine.get("cpu_threads") if isinstance(machine, dict) else None
        return int(threads) if threads is not None else None
    return None


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
    with torch.random.fork_rng(devices=[]):  # a random student init must not move the run's RNG
        teacher, teacher_net = build_teacher(config["teacher"], cpu)
        student, net_cfg = build_student(config["student"], teacher, teacher_net, cpu)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_process = max(1, config["batch_size"] // (world * config["accum"]))
    resolution = int(net_cfg["img_resolution"])
    shape = (min(2 * per_process, max_batch), int(net_cfg["in_channels"]), resolution, resolution)
    return pick_threads(student, shape, label_dim=int(net_cfg.get("label_dim") or 0))
