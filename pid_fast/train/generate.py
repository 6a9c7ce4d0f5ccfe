"""Sampling from a training checkpoint: the student (trained or EMA weights) and one-step samples
for given seeds (``pid-fast sample``, the FID of a run folder, the demo)."""

from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Optional

import torch
from torch import nn
from torch.nn import functional as F

from pid_fast.checks import parse_float
from pid_fast.models.diffusers_adapter import build_diffusers_network, is_diffusers_network, is_latent_network
from pid_fast.models.networks import build_network
from pid_fast.sampling import seeded_latents, student_sample
from pid_fast.train.builders import noise_labels
from pid_fast.train.checkpoint import load_latest_checkpoint, read_checkpoint

__all__ = ["load_student", "checkpoint_weights", "generate"]


def load_student(checkpoint: str | os.PathLike, weights: str = "model",
                 device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """(student network in eval mode, metadata) from a training checkpoint file or run folder.
    weights: "model" (the trained weights), "ema" (the slowest EMA) or "ema-<rate>"."""
    checkpoint = os.fspath(checkpoint)
    if os.path.isdir(checkpoint):
        found = load_latest_checkpoint(checkpoint)
        if found is None:
            raise FileNotFoundError(f"checkpoint: no checkpoint-*.pt in folder {checkpoint!r}")
        checkpoint, state = found
    elif os.path.isfile(checkpoint):
        state = read_checkpoint(checkpoint)
    else:
        raise FileNotFoundError(f"checkpoint: no such file or folder: {checkpoint!r}")
    meta = dict(state["student"], step=state["step"], path=checkpoint)
    net = build_diffusers_network(meta["network"]) if is_diffusers_network(meta["network"]) else build_network(
        meta["network"])  # a diffusers UNet student (needs diffusers) or an EDM network
    net.load_state_dict(checkpoint_weights(state, weights, checkpoint))
    return net.to(device).eval().requires_grad_(False), meta


def checkpoint_weights(state: Mapping[str, Any], weights: str, checkpoint: str) -> dict:
    """The state dict named by ``weights`` ("model", "ema" or "ema-<rate>") in a checkpoint."""
    if weights == "model":
        return state["model"]
    if weights != "ema" and not weights.startswith("ema-"):
        raise ValueError(f"weights must be 'model', 'ema' or 'ema-<rate>', got {weights!r}")
    emas = state["ema"]
    key = max(emas, key=float) if weights == "ema" else weights[4:]
    if key not in emas:  # "ema-0.990" names the EMA stored as "0.99"
        matches = [k for k in emas if float(k) == float(key)] if parse_float(key) is not None else []
        if not matches:
            raise ValueError(f"weights: no EMA with rate {key!r} in {checkpoint} (has {sorted(emas)})")
        key = matches[0]
    return emas[key]


@torch.no_grad()
def generate(net: nn.Module, meta: Mapping[str, Any], seeds, batch: int = 64, device="cpu",
             class_label: Optional[int] = None, decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             embeddings: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One-step samples (B, C, H, W) in [-1, 1] on the CPU for the given seeds (the latents and
    class labels of seed k depend only on k), and the integer class labels (or None).
    ``decode`` maps a latent student's unclamped samples to images in [-1, 1] (e.g.
    pid_fast.eval.vae.LatentDecoder). ``embeddings``: a text student's conditions, one prompt
    embedding per seed [len(seeds), L, D] (pid_fast.train.prompts.encode_for_sampling)."""
    seeds = list(seeds)
    label_dim = int(meta["label_dim"])
    if meta.get("text") is not None and (embeddings is None or embeddings.shape[0] != len(seeds)):
        got = "none" if embeddings is None else f"{embeddings.shape[0]}"
        raise ValueError(f"embeddings: this student is text-conditioned; pass one prompt embedding per seed "
                         f"({len(seeds)}), got {got} (pid-fast sample --prompt)")
    if class_label is not None and not (label_dim and 0 <= class_label < label_dim):
        raise ValueError(f"class_label must be in [0, {label_dim}) for this student, got {class_label!r}")
    c_noise = noise_labels(meta["noise_rule"])  # t -> the student's noise label
    latent = is_latent_network(meta.get("network"))  # a DiT's latents: not clamped to [-1, 1]
    images, classes = [], []
    for start in range(0, len(seeds), batch):
        z, labels = seeded_latents(seeds[start:start + batch], meta["shape"], label_dim, device=device)
        if labels is not None and class_label is not None:
            labels = F.one_hot(torch.full((z.shape[0],), class_label, device=device), label_dim).float()
        if embeddings is not None:
            labels = embeddings[start:start + batch].to(device)
        x = student_sample(net, z, labels, sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"],
                           sigma_data=meta["sigma_data"], noise_labels=c_noise,
                           clamp=decode is None and not latent)
        images.append((x if decode is None else decode(x)).float().cpu())
        if labels is not None and label_dim:
            classes.append(labels.argmax(1).cpu())
    return torch.cat(images), (torch.cat(classes) if classes else None)
