"""PID inside NVlabs/edm's own training loop: a loss with EDM's interface (``EDMPIDLoss``), and
EDM snapshots (or their converted files) as one-step generators (``one_step_generator``).

EDM's ``training/training_loop.py`` builds its loss from ``loss_kwargs`` (dnnlib's
``construct_class_by_name``), wraps the preconditioned network in DDP and per round calls

    loss = loss_fn(net=ddp, images=images, labels=labels, augment_pipe=augment_pipe)
    loss.sum().mul(loss_scaling / batch_gpu_total).backward()

and pickles ``dict(ema=..., loss_fn=loss_fn, augment_pipe=..., dataset_kwargs=...)`` into every
snapshot. ``EDMPIDLoss`` is that loss for PID: only ``loss_kwargs`` change
(``class_name='pid_fast.integrations.edm.EDMPIDLoss'``, ``teacher=<EDM .pkl or converted file>``,
grid and norm options), the README gives the invocation. It

- draws n = sigma_max z with the images' shape (PID needs no data: the images give the batch
  shape, device and, through ``labels``, the class labels);
- calls the student through DDP as EDM hands it over (a preconditioned EDMPrecond: F is
  recovered from its output, pid_fast.loss.student), so gradients are averaged over ranks;
- returns the per-sample PID loss broadcast to the images' shape: its mean over elements is the
  PID loss, and ``loss.sum() / batch`` (EDM's reduction) is (C H W) times PIDLoss's mean, as for
  EDM's own l2 losses;
- pickles as its settings and the teacher's path: a snapshot holds no teacher weights and no
  closure, and an unpickled loss reloads the teacher on its first call.
"""

from __future__ import annotations

import math
import os
import re
from typing import Any, Mapping, Optional

import torch
from torch import nn

from pid_fast.loss.distillation import PIDLoss

__all__ = ["EDMPIDLoss", "LOSS_SETTINGS", "one_step_generator"]

# The settings a snapshot's EDMPIDLoss records that its one-step sampler needs.
LOSS_SETTINGS = ("N", "sigma_min", "sigma_max", "rho", "sigma_data")


class EDMPIDLoss:
    """PID with EDM's loss interface ``loss_fn(net, images, labels=None, augment_pipe=None)``.

    teacher: the path of an EDM/EDM2 snapshot .pkl (its ``teacher_key`` entry, read by the safe
        importer) or of a file written by ``pid-fast convert``; or a teacher module (it is then
        pickled with the loss).
    N, sigma_min, sigma_max, rho, sigma_data (None: the teacher's), norm, huber_c, backend,
    batched, teacher_precision, student_parametrization, allow_stochastic_student: as for
    ``pid_fast.loss.PIDLoss``. lpips_weights: the LPIPS weights file for norm 'lpips'.
    allow_unknown_source: accept a teacher snapshot whose embedded network source is not a
    released EDM version (pid_fast.io.edm_sources).
    """

    def __init__(self, teacher: str | os.PathLike | nn.Module, teacher_key: str = "ema", N: int = 250,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 sigma_data: Optional[float] = None, norm: str = "l2", huber_c: Optional[float] = None,
                 lpips_weights: Optional[str] = None, backend: Optional[str] = None, batched: bool = True,
                 teacher_precision: Optional[str] = None, student_parametrization: Optional[str] = None,
                 allow_stochastic_student: bool = False, allow_unknown_source: bool = False):
        if isinstance(teacher, (str, os.PathLike)):
            teacher = os.fspath(teacher)
            if not os.path.isfile(teacher):
                raise FileNotFoundError(f"teacher: no such file: {teacher!r} (an EDM .pkl or a file written by "
                                        f"`pid-fast convert`)")
        elif not isinstance(teacher, nn.Module):
            raise TypeError(f"teacher must be a path or a torch.nn.Module, got {type(teacher).__name__}")
        if norm == "lpips" and lpips_weights is None:
            raise ValueError("lpips_weights: norm 'lpips' needs the LPIPS weights file")
        self.teacher = teacher
        self.teacher_key = teacher_key
        self.allow_unknown_source = bool(allow_unknown_source)
        self.lpips_weights = None if lpips_weights is None else os.fspath(lpips_weights)
        self.options = dict(N=N, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho, sigma_data=sigma_data, norm=norm,
                            huber_c=huber_c, backend=backend, batched=batched, teacher_precision=teacher_precision,
                            student_parametrization=student_parametrization,
                            allow_stochastic_student=allow_stochastic_student)
        self._loss: Optional[PIDLoss] = None
        loss = self._build(torch.device("cpu"))  # every argument checked now, not at EDM's first step
        self.sigma_data = loss.sigma_data
        for name in ("N", "sigma_min", "sigma_max", "rho"):
            setattr(self, name, getattr(loss, name))

    def _build(self, device: torch.device) -> PIDLoss:
        if isinstance(self.teacher, str):
            from pid_fast.io import load_teacher_with_config

            teacher, _ = load_teacher_with_config(self.teacher, key=self.teacher_key, device=device,
                                                  allow_unknown_source=self.allow_unknown_source, name="teacher")
        else:
            teacher = self.teacher.to(device)
        lpips = None
        if self.options["norm"] == "lpips":
            from pid_fast.eval.lpips import LPIPSNorm

            lpips = LPIPSNorm(self.lpips_weights).to(device)
        self._loss = PIDLoss(teacher, lpips=lpips, **self.options)
        return self._loss

    def _loss_on(self, device: torch.device) -> PIDLoss:
        loss = self._loss
        if loss is None:
            return self._build(device)
        if next(iter(loss.teacher.parameters()), torch.empty(0, device=device)).device != device:
            loss.to(device)
        return loss

    def __call__(self, net: Any, images: torch.Tensor, labels: Optional[torch.Tensor] = None,
                 augment_pipe: Any = None) -> torch.Tensor:
        """The per-sample PID loss broadcast to ``images``' shape (float32), for the noise
        n = sigma_max z with z ~ N(0, I) of that shape; ``net`` is the student as EDM holds it."""
        if augment_pipe is not None:
            raise ValueError("augment_pipe: PID trains without data, so data augmentation has no meaning here; "
                             "run EDM's train.py with --augment=0")
        if not isinstance(images, torch.Tensor) or images.dim() < 2:
            raise TypeError(f"images must be a (B, ...) tensor (it gives PID's batch shape), got "
                            f"{type(images).__name__}")
        if labels is not None and labels.dim() == 2 and labels.shape[1] == 0:
            labels = None  # EDM's unconditional datasets give (B, 0) labels
        loss = self._loss_on(images.device)
        dtype = images.dtype if images.dtype == torch.float64 else torch.float32
        noise = torch.randn(images.shape, device=images.device, dtype=dtype) * self.sigma_max
        per_sample = loss.per_sample(net, noise, labels)
        return per_sample.reshape((-1,) + (1,) * (images.dim() - 1)).expand(images.shape)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        if isinstance(self.teacher, str):
            state["_loss"] = None  # rebuilt from the teacher's path on the first call
        return state

    def __repr__(self) -> str:
        teacher = self.teacher if isinstance(self.teacher, str) else type(self.teacher).__name__
        return f"EDMPIDLoss(teacher={teacher!r}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items()) + ")"


# --------------------------------------------------------------------------------------------
# EDM snapshots as one-step generators (`pid-fast sample` / `pid-fast fid`)

def _loss_settings(recorded: Optional[Mapping[str, Any]]) -> dict:
    """The grid the student was trained on: the snapshot's recorded EDMPIDLoss settings, else the
    spec's constants (sigma_min 0.002, sigma_max 80)."""
    settings = {"sigma_min": 0.002, "sigma_max": 80.0}
    for key in ("sigma_min", "sigma_max"):
        value = (recorded or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
            settings[key] = float(value)
    return settings


def one_step_generator(path: str | os.PathLike, device: str | torch.device = "cpu", *, key: str = "ema",
                       allow_unknown_source: bool = False) -> tuple[nn.Module, dict]:
    """(the student's raw network in eval mode, its sampling metadata) from an EDM snapshot .pkl
    trained with EDMPIDLoss (its ``key`` network, read safely) or its `pid-fast convert` output,
    in the format ``pid_fast.train.generate`` samples from. The grid's sigma_min/sigma_max come
    from the EDMPIDLoss the snapshot (or the converted file's metadata) records, else 0.002/80;
    sigma_data from the recorded loss, else the network's preconditioning; the noise-label rule from the
    preconditioning."""
    from pid_fast.io import load_teacher_with_config
    from pid_fast.io.teachers import recorded_loss_settings
    from pid_fast.train.builders import student_metadata

    path = os.fspath(path)
    precond, config = load_teacher_with_config(path, key=key, device=device,
                                               allow_unknown_source=allow_unknown_source, name="checkpoint")
    network = dict(config["network"])
    recorded = recorded_loss_settings(path) or {}
    sigma_data = recorded.get("sigma_data", getattr(precond, "sigma_data", 0.5))  # the loss's c = 1/sqrt(sd^2 + T^2)
    meta = student_metadata(network, precond, _loss_settings(recorded), float(sigma_data))
    kimg = re.search(r"(\d+)\.pkl$", os.path.basename(path))
    meta.update(step=f"{int(kimg.group(1))} kimg" if kimg else "n/a", path=path)
    return precond.model.eval(), meta
