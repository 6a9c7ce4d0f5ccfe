"""The loop's device-side loss window: the losses since the last sync point, summed on the
device, read (the loop's only host sync) every log_every steps and before every checkpoint."""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import torch

from pid_fast.train.distributed import DistContext, all_reduce_min, all_reduce_sum

__all__ = ["LossWindow", "WindowStats"]


class WindowStats(NamedTuple):
    loss: float                # mean loss over the window's steps and all ranks
    images_per_s: float
    bad_step: Optional[int]    # the first step whose loss was not finite (None: all finite)
    bad_loss: float


class LossWindow:
    """The steps since the last sync point, summed on the device: the loss, and the first step
    whose loss was not finite with that loss. ``add`` never waits for the device; ``read``
    does (it is the loop's only host sync)."""

    NONE = 1 << 62  # first_bad_step when every loss was finite

    def __init__(self, step: int, device: torch.device):
        self.first_bad_step = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.step = torch.full((), step, dtype=torch.int64, device=device)
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.num_steps, self.start_time = 0, time.perf_counter()

    def add(self, step_loss: torch.Tensor) -> None:
        self.step += 1
        is_bad = ~torch.isfinite(step_loss) & (self.first_bad_step == self.NONE)
        self.first_bad_step = torch.where(is_bad, self.step, self.first_bad_step)
        self.bad_loss = torch.where(is_bad, step_loss, self.bad_loss)
        self.loss_sum += step_loss
        self.num_steps += 1

    def read(self, ctx: DistContext, global_batch: int) -> WindowStats:
        sums = torch.stack([self.loss_sum, self.bad_loss.double()])
        first_bad = self.first_bad_step.clone()
        all_reduce_sum(sums, ctx)
        all_reduce_min(first_bad, ctx)
        bad_step = int(first_bad)
        elapsed = time.perf_counter() - self.start_time
        return WindowStats(loss=float(sums[0]) / (self.num_steps * ctx.world_size),
                            images_per_s=self.num_steps * global_batch / max(elapsed, 1e-9),
                            bad_step=None if bad_step == self.NONE else bad_step, bad_loss=float(sums[1]))

    def reset(self) -> None:
        self.loss_sum.zero_()
        self.num_steps, self.start_time = 0, time.perf_counter()
