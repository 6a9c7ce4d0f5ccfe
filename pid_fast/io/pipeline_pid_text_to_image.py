"""A one-step text-to-image diffusers pipeline for a PID student of a text-conditioned latent
teacher (written by `pid-fast export-diffusers`).

This file is self-contained (torch and diffusers only): `pid-fast export-diffusers` copies it into
the exported folder next to model_index.json, which names it, so that a plain diffusers install
loads the folder offline::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("OUT", trust_remote_code=True)  # this file's code
    image = pipe("a red cat", generator=torch.Generator().manual_seed(0)).images[0]  # a PIL image

One step: the prompt's embedding e (the text encoder's last hidden state of the tokenizer's
max-length-padded ids, as StableDiffusionPipeline.encode_prompt), latents
x = noise_weight z + output_weight unet(input_scale z, timestep, encoder_hidden_states=e).sample
with z ~ N(0, I) (the student x(n, t) = (t/T) n + (1 - t/T) F(c n, c_noise(t), e) at t = sigma_min,
n = T z), decoded by the VAE as diffusers' pipelines decode: vae.decode(x / scaling_factor +
shift_factor). Classifier-free guidance is distilled into the student: one UNet call per image.
The constants are this pipeline's config (model_index.json).
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor


class PIDTextToImagePipeline(DiffusionPipeline):
    """One-step text-to-image sampling of a PID student (module docstring): a UNet2DConditionModel,
    the teacher's frozen text encoder, tokenizer and VAE, and the constants of the one-step sample."""

    model_cpu_offload_seq = "text_encoder->unet->vae"

    def __init__(self, unet, text_encoder, tokenizer, vae, timestep: float = 0.0, input_scale: float = 1.0,
                 noise_weight: float = 0.0, output_weight: float = 1.0, shape: Optional[List[int]] = None):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, vae=vae)
        self.register_to_config(timestep=float(timestep), input_scale=float(input_scale),
                                noise_weight=float(noise_weight), output_weight=float(output_weight),
                                shape=list(shape) if shape is not None else None)

    def _shape(self, batch_size: int) -> tuple:
        shape = self.config.shape
        if shape is None:
            size = self.unet.config.sample_size
            size = (size, size) if isinstance(size, int) else tuple(size)
            shape = [self.unet.config.in_channels, *size]
        return (batch_size, *shape)

    @torch.no_grad()
    def encode_prompt(self, prompts: List[str], device: torch.device) -> torch.Tensor:
        """Embeddings [P, L, D] of the prompts (truncated to the tokenizer's model_max_length)."""
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device) if getattr(self.text_encoder.config, "use_attention_mask", False) \
            else None
        return self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]

    @torch.no_grad()
    def __call__(self, prompt: Union[str, List[str]] = None, num_images_per_prompt: int = 1,
                 generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
                 latents: Optional[torch.Tensor] = None, prompt_embeds: Optional[torch.Tensor] = None,
                 num_inference_steps: int = 1, output_type: str = "pil", return_dict: bool = True,
                 **unused: Any) -> Union[ImagePipelineOutput, tuple]:
        """Images for ``prompt`` (a string or a list; or ``prompt_embeds`` [B, L, D]),
        ``num_images_per_prompt`` each, from ``latents`` z ~ N(0, I) or drawn with ``generator``.
        output_type: 'pil', 'np' (NHWC in [0, 1]), 'pt' (NCHW in [0, 1]) or 'latent' (the student's
        latents, not decoded)."""
        if num_inference_steps != 1:
            raise ValueError(f"num_inference_steps: a PID student samples in one step, got {num_inference_steps}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("pass prompt (a string or a list of strings) or prompt_embeds, not both")
        device = self._execution_device
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt([prompt] if isinstance(prompt, str) else list(prompt), device)
        embeds = prompt_embeds.to(device).repeat_interleave(num_images_per_prompt, dim=0)
        if latents is None:
            latents = randn_tensor(self._shape(embeds.shape[0]), generator=generator, device=device,
                                   dtype=torch.float32)
        z = latents.to(device=device, dtype=torch.float32)
        if z.shape[0] != embeds.shape[0]:
            raise ValueError(f"latents: {z.shape[0]} latents for {embeds.shape[0]} images")
        timestep = torch.full((z.shape[0],), self.config.timestep, device=device)
        out = self.unet((self.config.input_scale * z).to(self.unet.dtype), timestep,
                        encoder_hidden_states=embeds.to(self.unet.dtype)).sample
        if out.shape[1] == 2 * z.shape[1]:  # a learned-variance UNet: [prediction, variance]
            out = out[:, :z.shape[1]]
        x = self.config.noise_weight * z + self.config.output_weight * out.float()
        if output_type == "latent":
            images = x
        else:
            shift = getattr(self.vae.config, "shift_factor", None) or 0.0
            raw = x / self.vae.config.scaling_factor + shift
            decoded = self.vae.decode(raw.to(self.vae.dtype)).sample.float().clamp(-1, 1)
            images = decoded / 2 + 0.5
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
