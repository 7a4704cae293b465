"""What every lean-loop sampler shares: the pipeline's parts, the CFG combination and LoRA Composite's passes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import OptionError


@dataclass
class Conditioning:
    """One call's denoiser inputs that do not change over the steps.

    ``copies``: 2 when the denoiser batch is ``[uncond..., cond...]`` (classifier-free guidance, FLUX true CFG),
    else 1. ``scale``: the guidance scale that combines the two copies. ``inputs``: keyword arguments of every
    denoiser call (text embeddings, pooled embeddings, ids, guidance embedding).
    """

    copies: int
    scale: float
    inputs: dict = field(default_factory=dict)


class Sampler:
    """One denoiser family's lean loop parts (the loop itself is ``FusionPipeline._lean_call``).

    Subclasses set ``pipelines`` (the diffusers classes they drive), ``arguments`` (the call arguments they
    implement) and write ``condition``, ``initial_noise``, ``set_timesteps``, ``model_output`` and
    ``vae_latents``; prompt encoding, latent preparation and timesteps are the pipeline's own methods.
    """

    pipelines: tuple[str, ...] = ()
    arguments: frozenset = frozenset()
    denoiser_name = "transformer"

    def __init__(self, pipe):
        self.pipe = pipe

    @property
    def denoiser(self):
        return getattr(self.pipe, self.denoiser_name)

    @property
    def device(self) -> torch.device:
        return self.denoiser.device

    def default_size(self) -> int:
        """The pipeline's own default image side in pixels."""
        return self.pipe.default_sample_size * self.pipe.vae_scale_factor

    def size_multiple(self) -> int:
        """Image sides must be multiples of this (pixels per token side)."""
        return self.pipe.vae_scale_factor

    def predict(self, fusion, latents: torch.Tensor, t, conditioning: Conditioning, composite: bool) -> torch.Tensor:
        """The CFG-combined model output at ``t`` (LoRA Composite: one pass per LoRA, averaged before CFG)."""
        model_input = torch.cat([latents] * conditioning.copies) if conditioning.copies > 1 else latents
        if composite:
            passes = []
            for branch in ("subject", "style"):
                fusion.set_branch(branch)
                passes.append(self.model_output(model_input, t, conditioning))
            fusion.set_branch(None)
            output = torch.stack(passes).mean(0)
        else:
            output = self.model_output(model_input, t, conditioning)
        if conditioning.copies > 1:
            uncond, cond = output.chunk(2)
            output = uncond + conditioning.scale * (cond - uncond)
        return output

    def check_noise(self, latents: torch.Tensor, shape: tuple) -> torch.Tensor:
        if tuple(latents.shape) != tuple(shape):
            raise OptionError(f"latents have shape {tuple(latents.shape)}, expected {tuple(shape)} for "
                              f"{type(self.pipe).__name__} at this size and batch")
        return latents

    def decode(self, latents: torch.Tensor, output_type: str, height: int, width: int):
        """Latents -> the pipeline's output type, as its own call decodes them (``"latent"``: as sampled)."""
        if output_type == "latent":
            return latents
        vae = self.pipe.vae
        image = vae.decode(self.vae_latents(latents, height, width).to(vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)

    def vae_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """What ``vae.decode`` takes: ``latents / scaling_factor + shift_factor`` (and unpacked, for FLUX)."""
        config = self.pipe.vae.config
        return latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)

    def unpack(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """The sampler's latents as (B, C, h, w) VAE latents before scaling (identity but for FLUX)."""
        return latents
