"""FusionPipeline: a diffusers pipeline's own call with fused LoRAs; a lean loop only for LLR and composite."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .context import images_in_batch
from .errors import AttachError, OptionError
from .fusion import as_lora, attach_model
from .integration import attach_pipeline, call_signature, check_attachable, check_call_arguments, pipeline_base_class
from .model_path import load_local_pipeline
from .prompts import encode_prompts
from .trace import Trace

# What the lean loop (refine= or policy "composite") implements; any other argument is refused there.
LEAN_ARGUMENTS = frozenset({
    "prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "num_images_per_prompt", "height", "width",
    "generator", "latents", "output_type", "return_dict",
})
LEAN_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionXLPipeline")  # text-to-image SD 1.x/2.x and SDXL


@dataclass
class FusionPipelineOutput:
    images: list  # PIL images (output_type="pil"), a tensor ("pt"/"np"), or latents ("latent")
    trace: Trace | None
    references: tuple | None = None  # with refine: (Ic, Is), (B, 3, H, W) tensors in [0, 1]
    pipeline_output: object = None  # the wrapped pipeline's own output (e.g. its nsfw_content_detected)


class FusionPipeline:
    """Sample with a subject and a style LoRA fused by ``policy`` in every denoiser forward.

    A call is the wrapped pipeline's own call: the fusion is attached to the pipeline for its duration
    (``fe.attach(pipe, ...)``: layout and step followed per denoiser call) and detached afterwards, whatever
    happens, so every argument and default of ``pipe.__call__`` (img2img ``image``/``strength``, inpaint
    ``mask_image``, ControlNet, IP-Adapter, ``callback_on_step_end``, ``prompt_embeds``, SDXL ``prompt_2``, ...)
    is the pipeline's. What it adds: ``progress`` (show the pipeline's progress bar), the trace in the output,
    and, with ``refine``, the LLR arguments.

    Two things a diffusers pipeline cannot do run in fusion_engine's own lean loop instead: ``refine``
    (Latent-Level Refinement needs the gradient through x_t) and policy ``"composite"`` (one noise
    prediction per LoRA). The lean loop drives ``StableDiffusionPipeline`` and ``StableDiffusionXLPipeline``
    only (other pipelines are refused at construction) and implements the arguments in ``LEAN_ARGUMENTS``
    (any other is refused at call time), with the pipeline's own defaults.

    Args:
        pipe: a diffusers pipeline whose denoiser is ``pipe.unet`` (or ``pipe.transformer``).
        subject, style: ``LoRA`` objects, paths or state dicts (at least one).
        policy, divergence, granularity, backend, **policy_options: as ``fe.attach``.
        trace: record a per-call trace (``output.trace``: the heatmap of every step and layer).
        refine: a ``fusion_engine.refine.Refiner`` for LLR (each call then takes ``subject_prompt`` and
            ``style_prompt`` to make the references, or ``reference_images``).

    Example:
        >>> pipe = fe.FusionPipeline(sd_pipe, subject, style, policy="fls")
        >>> out = pipe("a sbu dog in szn style", num_inference_steps=30, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("out.png"); out.trace.heatmap("heatmap.png")
    """

    def __init__(self, pipe, subject=None, style=None, policy="fls", *, divergence: str = "kl",
                 granularity: str = "image", backend: str = "auto", trace: bool = True, refine=None,
                 **policy_options):
        self.pipe = pipe
        self.refine = refine
        self.subject, self.style = as_lora(subject, "subject"), as_lora(style, "style")
        if self.subject is None and self.style is None:
            raise AttachError("FusionPipeline needs a subject LoRA, a style LoRA, or both")
        if policy == "composite" and (self.subject is None or self.style is None):
            raise AttachError("policy 'composite' averages a subject pass and a style pass: it needs both LoRAs")
        self.policy = policy
        self.attach_options = dict(divergence=divergence, granularity=granularity, backend=backend, trace=trace,
                                   **policy_options)
        check_attachable(pipe)
        if self.uses_lean_loop:
            self._check_lean_pipeline()

    @property
    def uses_lean_loop(self) -> bool:
        """True with ``refine`` or policy ``"composite"``: fusion_engine's own loop, not the pipeline's."""
        return self.refine is not None or self.policy == "composite"

    def _check_lean_pipeline(self) -> None:
        base = pipeline_base_class(self.pipe)
        what = "refine= (LLR)" if self.refine is not None else "policy 'composite'"
        if not any(cls.__name__ in LEAN_PIPELINES for cls in base.__mro__):
            raise OptionError(
                f"{what} runs fusion_engine's own sampling loop, which drives {' and '.join(LEAN_PIPELINES)} only, "
                f"not {base.__name__}: its own features would be ignored. Use a text-to-image pipeline, or drop {what}"
            )
        if getattr(getattr(self.pipe, "unet", None), "encoder_hid_proj", None) is not None:
            raise OptionError(f"{what} runs fusion_engine's own sampling loop, which does not implement IP-Adapter; "
                              "unload it (pipe.unload_ip_adapter()) or drop " + what)

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

    def __call__(self, prompt=None, negative_prompt=None, *, progress: bool | None = None, subject_prompt=None,
                 style_prompt=None, reference_images=None, **kwargs):
        """Run the wrapped pipeline's call with the fusion attached; returns a ``FusionPipelineOutput``.

        Args:
            prompt, negative_prompt, **kwargs: the pipeline's own ``__call__`` arguments (every one, by keyword
                beyond these two), with the pipeline's defaults. ``return_dict=False`` returns the pipeline's
                tuple with the trace appended.
            progress: show (True) or hide (False) the pipeline's progress bar for this call; None leaves the
                pipeline's setting.
            subject_prompt, style_prompt, reference_images: LLR only (see ``refine``).
        """
        if prompt is not None:
            kwargs["prompt"] = prompt
        if negative_prompt is not None:
            kwargs["negative_prompt"] = negative_prompt
        llr = {"subject_prompt": subject_prompt, "style_prompt": style_prompt, "reference_images": reference_images}
        if self.refine is None and any(value is not None for value in llr.values()):
            given = sorted(name for name, value in llr.items() if value is not None)
            raise OptionError(f"{', '.join(given)}: LLR arguments, but this FusionPipeline has no refine=Refiner(...)")
        return_dict = kwargs.pop("return_dict", True)
        if self.uses_lean_loop:
            output = self._lean_call(kwargs, progress, llr)
        else:
            output = self._pipeline_call(kwargs, progress)
        if return_dict:
            return output
        own = output.pipeline_output.to_tuple() if output.pipeline_output is not None else (output.images,)
        return (*own, output.trace)

    def _pipeline_call(self, kwargs: dict, progress: bool | None) -> FusionPipelineOutput:
        with _progress_bar(self.pipe, progress), attach_pipeline(
                self.pipe, self.subject, self.style, policy=self.policy, **self.attach_options) as fusion:
            result = self.pipe(**kwargs, return_dict=True)
        trace = fusion.trace
        if trace is not None:
            trace.gather()
        return FusionPipelineOutput(result.images, trace, None, result)

    def _lean_arguments(self, kwargs: dict) -> dict:
        """The call's arguments with the pipeline's own defaults, or an ``OptionError`` for one the loop lacks."""
        unsupported = sorted(set(kwargs) - LEAN_ARGUMENTS)
        if unsupported:
            what = "refine= (LLR)" if self.refine is not None else "policy 'composite'"
            raise OptionError(
                f"{', '.join(unsupported)}: {what} runs fusion_engine's own sampling loop, which implements only "
                f"{', '.join(sorted(LEAN_ARGUMENTS))}; drop them, or drop {what} (then every argument of "
                f"{pipeline_base_class(self.pipe).__name__}.__call__ is the pipeline's own)"
            )
        defaults = {name: parameter.default for name, parameter in call_signature(self.pipe).parameters.items()
                    if name in LEAN_ARGUMENTS and parameter.default is not inspect.Parameter.empty}
        arguments = {**defaults, **kwargs}
        check_call_arguments(arguments)
        return arguments

    @torch.no_grad()
    def _lean_call(self, kwargs: dict, progress: bool | None, llr: dict) -> FusionPipelineOutput:
        """The lean loop (LLR, composite): prompt encoding and decoding borrowed from the pipeline."""
        args = self._lean_arguments(kwargs)
        prompt, negative_prompt = args.get("prompt"), args.get("negative_prompt")
        num_inference_steps, guidance_scale = args["num_inference_steps"], args["guidance_scale"]
        num_images_per_prompt, generator = args.get("num_images_per_prompt") or 1, args.get("generator")
        default_size = self.unet.config.sample_size * self.vae_scale_factor
        height, width = args.get("height") or default_size, args.get("width") or default_size
        prompts_list = [prompt] if isinstance(prompt, str) else list(prompt or [])
        images = images_in_batch(prompts_list, num_images_per_prompt, negative_prompt)  # BatchLayoutError if not
        guided = guidance_scale > 1.0
        prompts = encode_prompts(self.pipe, prompts_list, negative_prompt, num_images_per_prompt, guided, height, width)

        initial_noise = self._initial_noise(images, height, width, generator, args.get("latents"))
        refinement = None
        if self.refine is not None:  # before set_timesteps: the reference runs share this scheduler
            refinement = self.refine.start(
                self, noise=initial_noise, generator=generator, **llr, negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                num_images_per_prompt=num_images_per_prompt, height=height, width=width)
        self.scheduler.set_timesteps(num_inference_steps, device=self.unet.device)
        timesteps = self.scheduler.timesteps
        latents = initial_noise * self.scheduler.init_noise_sigma
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        show = progress if progress is not None else not getattr(self.pipe, "_progress_bar_config", {}).get("disable")

        fusion = attach_model(self.unet, self.subject, self.style, policy=self.policy, **self.attach_options)
        try:
            fusion.set_batch_layout(images, 2 if guided else 1)
            bar = tqdm(timesteps, desc=f"fusion {fusion.policy.describe()}", disable=not show, leave=False)
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
        return FusionPipelineOutput(self.decode(latents, args.get("output_type", "pil")), trace, references)

    def decode(self, latents: torch.Tensor, output_type: str = "pil"):
        if output_type == "latent":
            return latents
        config = self.vae.config
        scaled = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        image = self.vae.decode(scaled.to(self.vae.dtype), return_dict=False)[0]
        return self.pipe.image_processor.postprocess(image, output_type=output_type)


@contextmanager
def _progress_bar(pipe, show: bool | None):
    """The pipeline's progress bar shown or hidden for one call (None: its own setting), then put back."""
    if show is None:
        yield
        return
    had = "_progress_bar_config" in vars(pipe)
    saved = getattr(pipe, "_progress_bar_config", {})
    pipe._progress_bar_config = {**saved, "disable": not show}
    try:
        yield
    finally:
        if had:
            pipe._progress_bar_config = saved
        else:
            del pipe._progress_bar_config
