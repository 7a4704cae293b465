"""The lean loop's parts for FLUX (``FluxPipeline``): packed latents, flow matching, guidance embedding, true CFG.

As ``FluxPipeline.__call__`` does it, with its own helpers (``encode_prompt``, ``_pack_latents``,
``_prepare_latent_image_ids``, ``calculate_shift``, ``retrieve_timesteps``, ``_unpack_latents``):

* latents are 2x2-patch packed tokens ``(B, h/2 * w/2, 4 C)``; the pipeline's ``latents=`` takes them packed;
* timesteps come from ``FlowMatchEulerDiscreteScheduler`` with the resolution-dependent shift ``mu``
  (``calculate_shift`` of the image token count), and the transformer gets ``t / 1000``;
* a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) takes ``guidance_scale`` as an
  embedding: one transformer call per step, no CFG batch;
* ``true_cfg_scale > 1`` with a ``negative_prompt``: the pipeline runs the cond and the uncond pass as two
  transformer calls. Here both run as ONE call on the batch ``[uncond..., cond...]`` (copies = 2), so at
  granularity ``"image"`` an image's two passes pool into one decision per layer and step, exactly as the
  CFG halves of an SDXL batch do. The result is the pipeline's ``neg + s * (cond - neg)``.
"""
from __future__ import annotations

import numpy as np
import torch

from .base import Conditioning, Sampler

FLUX_ARGUMENTS = frozenset({
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "true_cfg_scale", "num_images_per_prompt",
    "height", "width", "generator", "latents", "output_type", "return_dict",
})


def uses_true_cfg(arguments: dict) -> bool:
    """``FluxPipeline``'s own rule: true CFG when ``true_cfg_scale > 1`` and a negative prompt is given.

    Args:
        arguments: a pipeline call's arguments by name (absent ones count as not given).

    Example:
        ```py
        >>> uses_true_cfg({"true_cfg_scale": 4.0, "negative_prompt": "blurry"})
        True
        ```
    """
    has_negative = arguments.get("negative_prompt") is not None or (
        arguments.get("negative_prompt_embeds") is not None
        and arguments.get("negative_pooled_prompt_embeds") is not None)
    return (arguments.get("true_cfg_scale") or 1.0) > 1 and has_negative


class FluxSampler(Sampler):
    pipelines = ("FluxPipeline",)
    arguments = FLUX_ARGUMENTS

    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        factor = self.pipe.vae_scale_factor * 2  # the VAE's factor, times 2 for the 2x2 packing
        return 2 * (int(height) // factor), 2 * (int(width) // factor)

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * 2  # the VAE's factor, times 2 for the 2x2 packing

    def condition(self, prompts: list, args: dict, height: int, width: int) -> Conditioning:
        pipe, images_per_prompt = self.pipe, args["num_images_per_prompt"]
        embeds, pooled, text_ids = pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                      num_images_per_prompt=images_per_prompt)
        copies = 1
        if uses_true_cfg(args):
            negative = args["negative_prompt"]
            negatives = [negative] * len(prompts) if isinstance(negative, str) else list(negative)
            negative_embeds, negative_pooled, _ = pipe.encode_prompt(
                prompt=negatives, prompt_2=None, device=self.device, num_images_per_prompt=images_per_prompt)
            embeds, pooled, copies = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled]), 2
        latent_height, latent_width = self._latent_size(height, width)
        image_ids = pipe._prepare_latent_image_ids(len(embeds), latent_height // 2, latent_width // 2, self.device,
                                                   embeds.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:
            guidance = torch.full([1], args["guidance_scale"], device=self.device, dtype=torch.float32)
            guidance = guidance.expand(len(embeds))
        inputs = {"encoder_hidden_states": embeds, "pooled_projections": pooled, "txt_ids": text_ids,
                  "img_ids": image_ids, "guidance": guidance}
        return Conditioning(copies, float(args.get("true_cfg_scale") or 1.0), inputs)

    def initial_noise(self, images: int, height: int, width: int, generator, latents, conditioning) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        channels = self.denoiser.config.in_channels // 4
        latent_height, latent_width = self._latent_size(height, width)
        dtype = conditioning.inputs["encoder_hidden_states"].dtype  # what FluxPipeline.prepare_latents uses
        packed = (images, (latent_height // 2) * (latent_width // 2), channels * 4)
        if latents is None:
            noise = randn_tensor((images, channels, latent_height, latent_width), generator=generator,
                                 device=self.device, dtype=dtype)
            latents = self.pipe._pack_latents(noise, images, channels, latent_height, latent_width)
        return self.check_noise(latents, packed).to(self.device, dtype)

    def set_timesteps(self, num_inference_steps: int, noise: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

        scheduler = self.pipe.scheduler
        config = scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if getattr(config, "use_flow_sigmas", False):
            sigmas = None
        mu = calculate_shift(noise.shape[1], config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return timesteps

    def scale_initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_output(self, model_input: torch.Tensor, t, conditioning: Conditioning) -> torch.Tensor:
        timestep = t.expand(model_input.shape[0]).to(model_input.dtype)
        return self.denoiser(hidden_states=model_input, timestep=timestep / 1000, **conditioning.inputs,
                             joint_attention_kwargs={}, return_dict=False)[0]

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return self.pipe._unpack_latents(latents, height, width, self.pipe.vae_scale_factor)

    def vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        return super().vae_latents(self.unpack(latents, height, width), height, width)
