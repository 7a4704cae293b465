"""The lean loop's parts for Stable Diffusion 3 (``StableDiffusion3Pipeline``): flow matching, CFG as one batch.

As ``StableDiffusion3Pipeline.__call__`` does it (its ``encode_prompt``, ``prepare_latents``,
``calculate_shift`` when the scheduler uses dynamic shifting, ``retrieve_timesteps``): the transformer runs
``[uncond..., cond...]`` in one call when ``guidance_scale > 1``, with the raw timestep (0..1000), and the
VAE decodes ``latents / scaling_factor + shift_factor``.
"""
from __future__ import annotations

import torch

from .base import Conditioning, Sampler
from .unet import UNET_ARGUMENTS


class SD3Sampler(Sampler):
    pipelines = ("StableDiffusion3Pipeline",)
    arguments = UNET_ARGUMENTS

    def size_multiple(self) -> int:
        return self.pipe.vae_scale_factor * self.denoiser.config.patch_size

    def condition(self, prompts: list, args: dict, height: int, width: int) -> Conditioning:
        guidance_scale = args["guidance_scale"]
        guided = guidance_scale > 1.0
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=args["num_images_per_prompt"], do_classifier_free_guidance=guided,
            negative_prompt=args.get("negative_prompt"))
        if guided:
            embeds, pooled = torch.cat([negative_embeds, embeds]), torch.cat([negative_pooled, pooled])
        return Conditioning(2 if guided else 1, guidance_scale,
                            {"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def initial_noise(self, images: int, height: int, width: int, generator, latents, conditioning) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        factor, dtype = self.pipe.vae_scale_factor, conditioning.inputs["encoder_hidden_states"].dtype
        shape = (images, self.denoiser.config.in_channels, int(height) // factor, int(width) // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.device, dtype=dtype)
        return self.check_noise(latents, shape).to(self.device, dtype)

    def set_timesteps(self, num_inference_steps: int, noise: torch.Tensor) -> torch.Tensor:
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
            calculate_shift,
            retrieve_timesteps,
        )

        scheduler, options = self.pipe.scheduler, {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", None):
            patch = self.denoiser.config.patch_size
            tokens = (noise.shape[2] // patch) * (noise.shape[3] // patch)
            options["mu"] = calculate_shift(tokens, config.get("base_image_seq_len", 256),
                                            config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                                            config.get("max_shift", 1.16))
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, self.device, **options)
        return timesteps

    def scale_initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise

    def model_output(self, model_input: torch.Tensor, t, conditioning: Conditioning) -> torch.Tensor:
        timestep = t.expand(model_input.shape[0])
        return self.denoiser(hidden_states=model_input, timestep=timestep, **conditioning.inputs,
                             joint_attention_kwargs=None, return_dict=False)[0]
