"""Teacher samples (``pid-fast sample --teacher``): a teacher from a trainer config, a teacher
file or a local diffusers folder, sampled with Heun or Euler from per-seed latents.

A diffusers teacher samples on its scheduler's own grid by default (grid="scheduler": the
sigmas, timesteps and initial-noise scale of diffusers' EulerDiscreteScheduler /
HeunDiscreteScheduler loop, pid_fast.sampling.ode_sample), so its samples are the ones diffusers
gives from the same latents; other teachers on EDM's Karras grid. The samples are the reference
of the distance-to-teacher numbers (``pid-fast fid RUN --ref teacher.npz``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch.nn import functional as F

from pid_fast.sampling import GRIDS, default_grid, ode_sample, seeded_latents

__all__ = ["load_sampling_teacher", "default_grid", "teacher_samples"]


def load_sampling_teacher(source: str | os.PathLike, device: torch.device | str = "cpu",
                          name: str = "--teacher") -> tuple[Any, tuple[int, int, int], int]:
    """(frozen teacher, image shape (C, H, W), label width) of ``source``: a local diffusers folder
    (save_pretrained), a trainer config (.json / .yaml / .yml: its 'teacher'), or a teacher file
    (an EDM .pkl or a file written by `pid-fast convert`)."""
    from pid_fast.train.builders import build_teacher
    from pid_fast.train.config import load_config, resolve_config
    from pid_fast.train.prompts import negative_embedding

    source = os.fspath(source)
    device = torch.device(device)
    if os.path.isdir(source):
        tcfg = {"kind": "diffusers", "path": source}
    elif not os.path.isfile(source):
        raise FileNotFoundError(f"{name}: no such file or folder: {source!r}")
    elif source.endswith((".json", ".yaml", ".yml")):
        tcfg = resolve_config(load_config(source))["teacher"]
    else:
        tcfg = {"kind": "edm", "path": source}
    teacher, net_cfg = build_teacher(tcfg, device, negative_embedding(tcfg, device))  # (a guided text teacher's)
    if net_cfg is None:
        raise ValueError(f"{name}: the {tcfg['kind']!r} teacher of {source!r} has no network, so no image shape; "
                         f"sample a teacher with a network (kinds 'network', 'edm', 'diffusers')")
    shape = (int(net_cfg["in_channels"]), int(net_cfg["img_resolution"]), int(net_cfg["img_resolution"]))
    return teacher, shape, int(getattr(teacher, "label_dim", 0))


@torch.no_grad()
def teacher_samples(teacher: Any, shape, label_dim: int, seeds, *, solver: str = "heun", num_steps: int = 18,
                    grid: Optional[str] = None, batch: int = 64, device: torch.device | str = "cpu",
                    class_label: Optional[int] = None, clamp: Optional[bool] = None,
                    embeddings: Optional[torch.Tensor] = None,
                    decode: Optional[Any] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Samples (B, C, H, W) on the CPU (clamped to [-1, 1] unless ``clamp`` is False; None: unless
    they are a latent teacher's (a DiT's) undecoded latents) and the
    integer class labels (or None) for ``seeds``: latents and labels of seed k from seed k alone
    (pid_fast.sampling.seeded_latents, as for student samples). grid: 'karras' | 'scheduler'
    (None: pid_fast.sampling.default_grid). A text teacher: ``embeddings`` [len(seeds), L, D], one
    prompt embedding per seed; ``decode``: latents -> images in [-1, 1] (pid_fast.train.prompts.pipeline_decoder)."""
    grid = default_grid(teacher) if grid is None else grid
    if clamp is None:
        main_net = getattr(getattr(teacher, "main", teacher), "model", None)  # a guided teacher's main network
        clamp = decode is not None or not getattr(main_net, "latent", False)
    if grid not in GRIDS:
        raise ValueError(f"grid must be one of {GRIDS}, got {grid!r}")
    if class_label is not None and not (label_dim and 0 <= class_label < label_dim):
        raise ValueError(f"class_label must be in [0, {label_dim}) for this teacher, got {class_label!r}")
    seeds = list(seeds)
    images, classes = [], []
    for start in range(0, len(seeds), batch):
        z, labels = seeded_latents(seeds[start:start + batch], shape, label_dim, device=device)
        if labels is not None and class_label is not None:
            labels = F.one_hot(torch.full((z.shape[0],), class_label, device=device), label_dim).float()
        if embeddings is not None:
            labels = embeddings[start:start + batch].to(device)
        x = ode_sample(teacher, z, labels, solver=solver, num_steps=num_steps, grid=grid).float()
        if decode is not None:
            x = decode(x)
        images.append((x.clamp(-1, 1) if clamp else x).cpu())
        if labels is not None and label_dim:
            classes.append(labels.argmax(1).cpu())
    return torch.cat(images), (torch.cat(classes) if classes else None)
