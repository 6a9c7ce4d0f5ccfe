"""A one-step diffusers pipeline for a PID student (written by `pid-fast export-diffusers`).

This file is self-contained (torch and diffusers only): `pid-fast export-diffusers` copies it into
the exported folder next to model_index.json, which names it, so that a plain diffusers install
loads the folder offline::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("OUT", trust_remote_code=True)  # this file's code
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0)).images  # PIL images

One step: x = noise_weight z + output_weight unet(input_scale z, timestep).sample, clamped to
[-1, 1], z ~ N(0, I): the student x(n, t) = (t/T) n + (1 - t/T) F(c n, c_noise(t)) at
t = sigma_min with n = T z (pid_fast/io/diffusers_io.py). The constants are this pipeline's
config (model_index.json). The timestep goes to the UNet as a tensor: diffusers casts a Python
number to an integer. A learned-variance UNet (out_channels = 2 in_channels) gives its first half.
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class PIDOneStepPipeline(DiffusionPipeline):
    """One-step sampling of a PID student: a UNet2DModel (or UNet2DConditionModel) and the
    constants of its one-step sample (module docstring)."""

    model_cpu_offload_seq = "unet"

    def __init__(self, unet, timestep: float = 0.0, input_scale: float = 1.0, noise_weight: float = 0.0,
                 output_weight: float = 1.0, clamp: Optional[List[float]] = None,
                 shape: Optional[List[int]] = None, label_dim: int = 0):
        super().__init__()
        self.register_modules(unet=unet)
        self.register_to_config(timestep=float(timestep), input_scale=float(input_scale),
                                noise_weight=float(noise_weight), output_weight=float(output_weight),
                                clamp=list(clamp) if clamp is not None else None,
                                shape=list(shape) if shape is not None else None, label_dim=int(label_dim))

    def _shape(self, batch_size: int) -> tuple:
        shape = self.config.shape
        if shape is None:
            size = self.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = [self.unet.config.in_channels, *size]
        return (batch_size, *shape)

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, class_labels: Optional[torch.Tensor] = None,
                 num_inference_steps: int = 1, output_type: str = "pil", return_dict: bool = True,
                 **unet_kwargs: Any) -> Union[ImagePipelineOutput, tuple]:
        """Images from latents z ~ N(0, I) (``latents``, else drawn with ``generator``: a list of
        generators draws sample k from generator k). ``class_labels``: integer classes of a
        class-conditional UNet. output_type: 'pil', 'np' (NHWC in [0, 1]), 'pt' (NCHW in [0, 1]) or
        'latent' (NCHW in [-1, 1], the student's sample itself)."""
        if num_inference_steps != 1:
            raise ValueError(f"num_inference_steps: a PID student samples in one step, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        device = self._execution_device
        if latents is None:
            if isinstance(generator, list):
                batch_size = len(generator)
            latents = randn_tensor(self._shape(batch_size), generator=generator, device=device,
                                   dtype=torch.float32)
        z = latents.to(device=device, dtype=torch.float32)
        if self.config.label_dim:
            if class_labels is None:
                raise ValueError(f"class_labels: this student is class-conditional ({self.config.label_dim} "
                                 f"classes); pass integer labels [batch]")
            unet_kwargs["class_labels"] = torch.as_tensor(class_labels, device=device).reshape(-1).long()
        timestep = torch.full((z.shape[0],), self.config.timestep, device=device)
        out = self.unet((self.config.input_scale * z).to(self.unet.dtype), timestep, **unet_kwargs).sample
        if out.shape[1] == 2 * z.shape[1]:  # a learned-variance UNet: [prediction, variance]
            out = out[:, :z.shape[1]]
        x = self.config.noise_weight * z + self.config.output_weight * out.float()
        if self.config.clamp is not None:  # images in [-1, 1]; a latent student's (DiT) are not clamped
            x = x.clamp(*self.config.clamp)
        if output_type == "latent":
            images = x
        else:
            images = (x / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images) if images.shape[-1] in (1, 3) else images
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
