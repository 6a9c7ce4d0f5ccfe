"""Dashboards beside log.jsonl (config ``log``): TensorBoard event files and W&B runs, written by
rank 0 only. log.jsonl stays the record; these are views of the same numbers.

    "log": {"tensorboard": true}   -> RUN/tensorboard/events.out.tfevents.*  (torch.utils.tensorboard;
                                      pip install pid_fast[tensorboard])
    "log": {"wandb": true}         -> a W&B run in RUN/wandb (project log.wandb_project; WANDB_MODE=offline
                                      for no network); its id is kept in RUN/wandb-id, so a resumed
                                      run continues the same W&B run (resume="allow")

Scalars: train/loss, train/lr, train/grad_norm, train/images_per_s at every log step; the
snapshot grid as the image samples/one_step at every snapshot.
"""

from __future__ import annotations

import importlib.util
import os
import secrets
from typing import Any, Mapping, Optional

import torch

from pid_fast.eval.images import image_grid
from pid_fast.io.atomic import atomic_write

__all__ = ["TRACKER_PACKAGES", "check_trackers", "Trackers"]

# config key -> (module that must import, pip extra / package to install)
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "pid_fast[tensorboard]"), "wandb": ("wandb", "pid_fast[wandb]")}
TENSORBOARD_DIR = "tensorboard"
WANDB_ID_FILE = "wandb-id"


def wandb_run_id(run_dir: str) -> str:
    """The W&B run id of ``run_dir``: read from RUN/wandb-id, or made (8 characters of [0-9a-f], as
    W&B's own ids are lowercase alphanumerics) and written there at the first start."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            run_id = f.read().strip()
        if run_id:
            return run_id
    run_id = secrets.token_hex(4)
    atomic_write(path, run_id.encode() + b"\n")
    return run_id


def check_trackers(log_cfg: Mapping[str, Any]) -> None:
    """ImportError naming the config key when a requested tracker's package is missing (checked
    on every rank before training, so no rank starts alone)."""
    for key, (module, install) in TRACKER_PACKAGES.items():
        if log_cfg.get(key) and importlib.util.find_spec(module) is None:
            raise ImportError(f"config['log.{key}'] is true but the {module!r} package is not installed "
                              f"(pip install {install})")


class Trackers:
    """The dashboards of one run (empty off rank 0 or when none is configured)."""

    def __init__(self, log_cfg: Mapping[str, Any], run_dir: str, config: Mapping[str, Any], rank: int,
                 resume_step: int = 0):
        self.tensorboard = self.wandb = None
        if rank != 0:
            return
        if log_cfg["tensorboard"]:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: a resumed run drops the events logged after its checkpoint (a killed run's tail)
            self.tensorboard = SummaryWriter(os.path.join(run_dir, TENSORBOARD_DIR),
                                             purge_step=resume_step + 1 if resume_step else None)
        if log_cfg["wandb"]:
            import wandb

            self.wandb = wandb.init(project=log_cfg["wandb_project"], dir=run_dir, config=dict(config),
                                    name=os.path.basename(os.path.abspath(run_dir)), id=wandb_run_id(run_dir),
                                    resume="allow")

    @property
    def active(self) -> bool:
        return self.tensorboard is not None or self.wandb is not None

    def scalars(self, step: int, values: Mapping[str, Optional[float]]) -> None:
        values = {f"train/{k}": float(v) for k, v in values.items() if v is not None}
        if self.tensorboard is not None:
            for tag, value in values.items():
                self.tensorboard.add_scalar(tag, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def images(self, step: int, x: torch.Tensor) -> None:
        """The snapshot's one-step samples (B, C, H, W) in [-1, 1] as one grid image."""
        if not self.active or x.shape[1] not in (1, 3):
            return
        grid = image_grid(x)
        if self.tensorboard is not None:
            self.tensorboard.add_image("samples/one_step", grid, step, dataformats="HWC")
            self.tensorboard.flush()
        if self.wandb is not None:
            import wandb

            self.wandb.log({"samples/one_step": wandb.Image(grid)}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.tensorboard = self.wandb = None
