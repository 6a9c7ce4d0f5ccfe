"""Evaluating a text-to-image student (nothing is downloaded):

- ``rmse_to_teacher``: the per-sample RMSE between the student's one-step latents and its (guided)
  teacher's Heun samples from the same noise and prompt, on the PID range [sigma_min, sigma_max]
  of the run (the ODE PID distils; no extra weights needed);
- ``clip_score``: the usual text-alignment number, 100 x max(cos(image embedding, text embedding), 0)
  per image (torchmetrics' CLIPScore definition), with a CLIP model from a local folder
  (transformers' CLIPModel + its tokenizer; images resized to the vision tower's size and normalised
  with the folder's preprocessor_config.json mean/std, CLIP's own by default).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import torch
from torch.nn import functional as F

from pid_fast.sampling import ode_sample, seeded_latents, student_sample

__all__ = ["CLIP_MEAN", "CLIP_STD", "rmse_to_teacher", "ClipScorer", "clip_score"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@torch.no_grad()
def rmse_to_teacher(net: Any, meta: Mapping[str, Any], teacher: Any, embeddings: torch.Tensor, seeds: Sequence[int],
                    *, num_steps: int = 18, batch: int = 16, device: torch.device | str = "cpu"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-sample RMSE [B], student latents, teacher latents): the student's one-step sample of seed
    k with ``embeddings[k]`` against the teacher's Heun sample (``num_steps`` steps, EDM's grid within
    the run's [sigma_min, sigma_max]) from the same latents z and embedding. ``net``, ``meta``: a
    loaded student (pid_fast.train.load_student); ``teacher``: the run's (guided) teacher."""
    from pid_fast.train.builders import noise_labels

    seeds = list(seeds)
    if embeddings.shape[0] != len(seeds):
        raise ValueError(f"embeddings: one per seed ({len(seeds)}), got {embeddings.shape[0]}")
    c_noise = noise_labels(meta["noise_rule"])
    students, teachers = [], []
    for start in range(0, len(seeds), batch):
        z, _ = seeded_latents(seeds[start:start + batch], meta["shape"], 0, device=device)
        emb = embeddings[start:start + batch].to(device)
        students.append(student_sample(net, z, emb, sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"],
                                       sigma_data=meta["sigma_data"], noise_labels=c_noise, clamp=False).float().cpu())
        teachers.append(ode_sample(teacher, z, emb, solver="heun", num_steps=num_steps, sigma_min=meta["sigma_min"],
                                   sigma_max=meta["sigma_max"], grid="karras").float().cpu())
    student, reference = torch.cat(students), torch.cat(teachers)
    rmse = (student - reference).square().flatten(1).mean(1).sqrt()
    return rmse, student, reference


def _preprocessing(folder: str, vision_size: int) -> tuple[int, tuple, tuple]:
    path = os.path.join(folder, "preprocessor_config.json")
    if not os.path.isfile(path):
        return vision_size, CLIP_MEAN, CLIP_STD
    with open(path) as f:
        config = json.load(f)
    return vision_size, tuple(config.get("image_mean", CLIP_MEAN)), tuple(config.get("image_std", CLIP_STD))


class ClipScorer:
    """CLIP score of images against prompts with a local CLIP folder (module docstring)."""

    def __init__(self, folder: str | os.PathLike, device: torch.device | str = "cpu"):
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"--clip: no such folder: {folder!r} (a CLIP model saved with save_pretrained: "
                                    f"config.json + weights + tokenizer files)")
        try:
            import transformers
        except ImportError:
            raise ImportError("CLIP score needs transformers (not installed): pip install 'pid_fast[text]'") from None
        try:
            self.model = transformers.CLIPModel.from_pretrained(folder, local_files_only=True).to(device).eval()
            self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--clip: {folder!r} is not a loadable CLIP folder (CLIPModel + tokenizer): "
                             f"{exc}") from None
        self.device = torch.device(device)
        self.size, mean, std = _preprocessing(folder, int(self.model.config.vision_config.image_size))
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str], batch: int = 32) -> torch.Tensor:
        """Per-image CLIP scores [B] of images [B, 3, H, W] in [-1, 1] against one prompt each."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected RGB images [B, 3, H, W] in [-1, 1], got "
                             f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompts: one per image ({images.shape[0]}), got {len(prompts)}")
        scores = []
        for start in range(0, images.shape[0], batch):
            x = (images[start:start + batch].to(self.device, torch.float32) + 1) / 2
            x = F.interpolate(x, size=(self.size, self.size), mode="bicubic", align_corners=False, antialias=True)
            x = (x.clamp(0, 1) - self.mean) / self.std
            tokens = self.tokenizer(list(prompts[start:start + batch]), padding=True, truncation=True,
                                    return_tensors="pt").to(self.device)
            image_emb = self.model.get_image_features(pixel_values=x)
            text_emb = self.model.get_text_features(**tokens)
            image_emb = getattr(image_emb, "pooler_output", image_emb)  # (a model output in some versions)
            text_emb = getattr(text_emb, "pooler_output", text_emb)
            cos = F.cosine_similarity(image_emb.float(), text_emb.float(), dim=-1)
            scores.append((100 * cos).clamp_min(0).cpu())
        return torch.cat(scores)


def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_folder: str | os.PathLike,
               device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-image CLIP scores (``ClipScorer``)."""
    return ClipScorer(clip_folder, device)(images, prompts)
