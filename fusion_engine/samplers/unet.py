"""The lean loop's parts for UNet pipelines: Stable Diffusion 1.x/2.x and SDXL (text-to-image)."""
from __future__ import annotations

import torch

from .base import Conditioning, Sampler
from .prompts import encode_prompts

UNET_ARGUMENTS = frozenset({
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "height", "width",
    "generator", "latents", "output_type", "return_dict",
})


class UNetSampler(Sampler):
    """CFG as one ``[uncond..., cond...]`` batch; any scheduler the pipeline takes (epsilon, v, sample)."""

    pipelines = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")
    arguments = UNET_ARGUMENTS
    denoiser_name = "unet"

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.pipe.vae.config.block_out_channels) - 1)

    def default_size(self) -> int:
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def size_multiple(self) -> int:
        return self.vae_scale_factor

    def condition(self, prompts: list, args: dict, height: int, width: int) -> Conditioning:
        guidance_scale = args["guidance_scale"]
        guided = guidance_scale > 1.0
        batch = encode_prompts(self.pipe, prompts, args.get("negative_prompt"), args["num_images_per_prompt"], guided,
                               height, width)
        inputs = {"encoder_hidden_states": batch.embeds, "added_cond_kwargs": batch.added_cond_kwargs}
        return Conditioning(2 if guided else 1, guidance_scale, inputs)

    def initial_noise(self, images: int, height: int, width: int, generator, latents, conditioning) -> torch.Tensor:
        from diffusers.utils.torch_utils import randn_tensor

        unet, factor = self.denoiser, self.vae_scale_factor
        shape = (images, unet.config.in_channels, height // factor, width // factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=unet.device, dtype=unet.dtype)
        return self.check_noise(latents, shape).to(unet.device, unet.dtype)

    def set_timesteps(self, num_inference_steps: int, noise: torch.Tensor) -> torch.Tensor:
        self.pipe.scheduler.set_timesteps(num_inference_steps, device=self.device)
        return self.pipe.scheduler.timesteps

    def scale_initial_noise(self, noise: torch.Tensor) -> torch.Tensor:
        return noise * self.pipe.scheduler.init_noise_sigma

    def model_output(self, model_input: torch.Tensor, t, conditioning: Conditioning) -> torch.Tensor:
        model_input = self.pipe.scheduler.scale_model_input(model_input, t)
        return self.denoiser(model_input, t, **conditioning.inputs, return_dict=False)[0]
