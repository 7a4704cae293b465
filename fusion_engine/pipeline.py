"""FusionPipeline: a lean sampler that drives a diffusers SD/SDXL pipeline's parts with fused LoRAs."""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .context import images_in_batch
from .errors import AttachError, OptionError
from .fusion import _as_lora, attach
from .model_path import load_local_pipeline
from .prompts import encode_prompts
from .trace import Trace


@dataclass
class FusionPipelineOutput:
    images: list  # PIL images (output_type="pil"), a tensor ("pt"), or latents ("latent")
    trace: Trace | None
    references: tuple | None = None  # with refine: (Ic, Is), (B, 3, H, W) tensors in [0, 1]


class FusionPipeline:
    """Sample with a subject and a style LoRA fused by ``policy`` in every UNet forward.

    Borrows the text encoder(s), tokenizer(s), VAE and scheduler of a diffusers pipeline; the
    UNet is fused for the duration of each call and detached afterwards, whatever happens.
    ``refine``: a ``fusion_engine.refine.Refiner`` for Latent-Level Refinement at every step (then each call
    takes ``subject_prompt``/``style_prompt`` to make the references, or ``reference_images``).
    """

    def __init__(self, pipe, subject=None, style=None, policy="fls", *, divergence: str = "kl",
                 granularity: str = "image", backend: str = "auto", trace: bool = True, refine=None,
                 **policy_options):
        self.pipe = pipe
        self.refine = refine
        self.subject, self.style = _as_lora(subject, "subject"), _as_lora(style, "style")
        if self.subject is None and self.style is None:
            raise AttachError("FusionPipeline needs a subject LoRA, a style LoRA, or both")
        if policy == "composite" and (self.subject is None or self.style is None):
            raise AttachError("policy 'composite' averages a subject pass and a style pass: it needs both LoRAs")
        self.policy = policy
        self.attach_options = dict(divergence=divergence, granularity=granularity, backend=backend, trace=trace,
                                   **policy_options)

    @classmethod
    def from_pipe(cls, pipe, subject=None, style=None, policy="fls", **options) -> FusionPipeline:
        """Options as ``__init__`` (``refine=`` included)."""
        return cls(pipe, subject, style, policy, **options)

    @classmethod
    def from_pretrained(cls, path, subject=None, style=None, policy="fls", *, torch_dtype=None, device=None,
                        **options) -> FusionPipeline:
        """Load a diffusers pipeline folder from local disk (never the network)."""
        pipe = load_local_pipeline(path, torch_dtype, device)  # a ModelPathError names what the path is instead
        return cls(pipe, subject, style, policy, **options)

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def vae(self):
        return self.pipe.vae

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _initial_noise(self, images, height, width, generator, latents):
        from diffusers.utils.torch_utils import randn_tensor

        shape = (images, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=self.unet.device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise OptionError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        return latents.to(self.unet.device, self.unet.dtype)

    def _noise(self, fusion, latents, t, prompts, guidance_scale, composite):
        guided = guidance_scale > 1.0
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = self.scheduler.scale_model_input(model_input, t)

        def predict():
            return self.unet(model_input, t, encoder_hidden_states=prompts.embeds,
                             added_cond_kwargs=prompts.added_cond_kwargs, return_dict=False)[0]

        if composite:  # LoRA Composite: one pass per LoRA, predictions averaged before CFG
            passes = []
            for branch in ("subject", "style"):
                fusion.set_branch(branch)
                passes.append(predict())
            fusion.set_branch(None)
            noise = torch.stack(passes).mean(0)
        else:
            noise = predict()
        if guided:
            uncond, cond = noise.chunk(2)
            noise = uncond + guidance_scale * (cond - uncond)
        return noise

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, *, num_inference_steps: int = 50, guidance_scale: float = 5.0,
                 num_images_per_prompt: int = 1, height: int | None = None, width: int | None = None,
                 generator: torch.Generator | None = None, latents: torch.Tensor | None = None,
                 output_type: str = "pil", progress: bool = True, subject_prompt=None, style_prompt=None,
                 reference_images=None) -> FusionPipelineOutput:
        """``subject_prompt``, ``style_prompt``, ``reference_images=(subject, style)``: LLR only (see ``refine``)."""
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default_size, width or default_size
        prompts_list = [prompt] if isinstance(prompt, str) else list(prompt)
        images = images_in_batch(prompts_list, num_images_per_prompt, negative_prompt)  # BatchLayoutError if not
        guided = guidance_scale > 1.0
        prompts = encode_prompts(self.pipe, prompts_list, negative_prompt, num_images_per_prompt, guided, height, width)

        initial_noise = self._initial_noise(images, height, width, generator, latents)
        refinement = None
        if self.refine is not None:  # before set_timesteps: the reference runs share this scheduler
            refinement = self.refine.start(
                self, noise=initial_noise, generator=generator, subject_prompt=subject_prompt,
                style_prompt=style_prompt, reference_images=reference_images, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt, height=height, width=width)
        self.scheduler.set_timesteps(num_inference_steps, device=self.unet.device)
        timesteps = self.scheduler.timesteps
        latents = initial_noise * self.scheduler.init_noise_sigma
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}

        fusion = attach(self.unet, self.subject, self.style, policy=self.policy, **self.attach_options)
        try:
            fusion.set_batch_layout(images, 2 if guided else 1)
            bar = tqdm(timesteps, desc=f"fusion {fusion.policy.describe()}", disable=not progress, leave=False)
            for step, t in enumerate(bar):
                fusion.set_step(step, len(timesteps))
                composite = self.policy == "composite"
                if refinement is not None and refinement.active(step, len(timesteps)):
                    def predict(x, t=t, composite=composite):
                        return self._noise(fusion, x, t, prompts, guidance_scale, composite)

                    latents = refinement.step(fusion, latents, t, predict, step_kwargs)
                    continue
                noise = self._noise(fusion, latents, t, prompts, guidance_scale, composite)
                latents = self.scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        finally:
            fusion.detach()
        trace = fusion.trace
        if trace is not None:
            trace.gather()
        references = refinement.reference_images if refinement is not None else None
        return FusionPipelineOutput(self.decode(latents, output_type), trace, references)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        if output_type == "latent":
            return latents
        config = self.vae.config
        scaled = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        image = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)
