"""FusionPipeline: a diffusers pipeline's own call with fused LoRAs; a lean loop for LLR, composite, FLUX true CFG."""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import AttachError, OptionError
from ..policies import divergence_option, make_policy
from ..runtime.context import images_in_batch, normalize_assignment
from ..runtime.fusion import as_lora, attach_model, check_bank
from ..runtime.trace import Trace
from ..samplers import LEAN_PIPELINES, FluxSampler, sampler_for, uses_true_cfg
from ..utils.deprecation import renamed_option, warn_renamed
from .attach import (
    attach_pipeline,
    call_signature,
    check_attachable,
    check_call_arguments,
    denoiser_name,
    loras_per_image,
    pipeline_base_class,
)
from .model_path import DIT_FAMILIES, load_local_pipeline


@dataclass
class FusionPipelineOutput:
    images: list  # PIL images (output_type="pil"), a tensor ("pt"/"np"), or latents ("latent")
    trace: Trace | None
    references: tuple | None = None  # with refine: (Ic, Is), (B, 3, H, W) tensors in [0, 1]
    pipeline_output: object = None  # the wrapped pipeline's own output (e.g. its nsfw_content_detected)
    loras: list | None = None  # with a pool: each image's LoRA names (trace.image_summary(i, loras[i]))

    @property
    def pairs(self) -> list | None:
        """Deprecated name of ``loras``."""
        warn_renamed("FusionPipelineOutput.pairs", "FusionPipelineOutput.loras")
        return self.loras


class FusionPipeline:
    """Sample with a subject and a style LoRA fused by ``policy`` in every denoiser forward.

    A call is the wrapped pipeline's own call: the fusion is attached to the pipeline for its duration
    (``fe.attach(pipe, ...)``: layout and step followed per denoiser call) and detached afterwards, whatever
    happens, so every argument and default of ``pipe.__call__`` (img2img ``image``/``strength``, inpaint
    ``mask_image``, ControlNet, IP-Adapter, ``callback_on_step_end``, ``prompt_embeds``, SDXL ``prompt_2``, ...)
    is the pipeline's. What it adds: ``progress`` (show the pipeline's progress bar), the trace in the output,
    and, with ``refine``, the LLR arguments.

    Three things a diffusers pipeline cannot do run in fusion_engine's own lean loop instead: ``refine``
    (Latent-Level Refinement needs the gradient through x_t), policy ``"composite"`` (one noise prediction
    per LoRA), and FLUX's true CFG (``true_cfg_scale > 1`` with a ``negative_prompt``: ``FluxPipeline`` runs
    the uncond and cond passes as two transformer calls, which could not share one decision per image; the
    lean loop runs them as one ``[uncond, cond]`` batch, so they pool as SDXL's CFG halves do). The lean
    loop drives ``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``FluxPipeline`` and
    ``StableDiffusion3Pipeline`` (``fusion_engine.samplers``; others are refused at construction) and
    implements the arguments in its sampler's ``arguments`` (any other is refused at call time), with the
    pipeline's own defaults. A transformer (DiT) pipeline of another family than FLUX's and SD3's is refused
    at construction, whatever the policy.

    With ``pool=`` (a ``fe.LoRAPool``, instead of ``subject``/``style``) every call takes ``loras=[...]`` beside its
    prompts, one entry per prompt or per image (a LoRA name, a pair, or more names): each image (and its CFG copy)
    fuses its own LoRAs, as ``fe.attach(pipe, pool=pool)`` does, and is the image a single-pair FusionPipeline of
    its own pair makes with the same seed; ``refine`` (each image naming a (subject, style) pair) and policy
    ``"composite"`` (position 0, then 1) run on a pool too.

    Args:
        pipe: a diffusers pipeline whose denoiser is ``pipe.unet`` (SD, SDXL) or ``pipe.transformer`` (FLUX, SD3).
        subject, style: ``LoRA`` objects, paths or state dicts (at least one), or neither with ``pool``.
        policy, divergence, granularity, backend, **policy_options: as ``fe.attach`` (with ``pool``: as
            ``fe.attach(pipe, pool=pool, ...)``).
        pool: a ``fe.LoRAPool`` on the denoiser's device and dtype; each call then names LoRAs per image.
        trace: record a per-call trace (``output.trace``: the heatmap of every step and layer).
        refine: a ``fusion_engine.refine.Refiner`` for LLR (each call then takes ``subject_prompt`` and
            ``style_prompt`` to make the references, or ``reference_images``).

    Example:
        >>> pipe = fe.FusionPipeline(sd_pipe, subject, style, policy="fls")
        >>> out = pipe("a sbu dog in szn style", num_inference_steps=30, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].save("out.png"); out.trace.heatmap("heatmap.png")
        >>> pooled = fe.FusionPipeline(sd_pipe, pool=pool, policy="fls")
        >>> out = pooled(["a dog", "a cat"], loras=[("dog", "watercolor"), ("cat", "pixel-art")])
        >>> out.trace.image_summary(1, out.loras[1])  # how often each of image 1's LoRAs was kept
    """

    def __init__(self, pipe, subject=None, style=None, policy="fls", *, divergence: str | None = None,
                 granularity: str = "image", backend: str = "auto", trace: bool = True, refine=None, pool=None,
                 **policy_options):
        self.pipe = pipe
        self.refine = refine
        self.pool = pool
        self.subject, self.style = as_lora(subject, "subject"), as_lora(style, "style")
        check_bank(self.subject, self.style, pool, "FusionPipeline")
        if pool is not None:  # refused now, not at the call
            make_policy(policy, pool=True, **policy_options, **divergence_option(policy, divergence))
        if policy == "composite" and pool is None and (self.subject is None or self.style is None):
            raise AttachError("policy 'composite' averages a subject pass and a style pass: it needs both LoRAs")
        self.policy = policy
        self.attach_options = dict(divergence=divergence, granularity=granularity, backend=backend, trace=trace,
                                   **policy_options)
        check_attachable(pipe)
        self._check_denoiser()
        if self.uses_lean_loop:
            self._check_lean_pipeline()

    def _check_denoiser(self) -> None:
        """Refuse a transformer pipeline of a family this library does not drive (layout, step, CFG unknown)."""
        base = pipeline_base_class(self.pipe)
        if denoiser_name(self.pipe) == "transformer" and not base.__name__.startswith(DIT_FAMILIES):
            raise AttachError(
                f"FusionPipeline drives UNet pipelines (SD 1.x/2.x, SDXL) and the FLUX and SD3 transformer pipelines, "
                f"not {base.__name__}: its denoiser is a transformer whose batch layout and guidance this library "
                "does not know. Attach to the model yourself (fe.attach(pipe.transformer, ...)) and set the layout "
                "and step per call"
            )

    @property
    def uses_lean_loop(self) -> bool:
        """True with ``refine`` or policy ``"composite"``: fusion_engine's own loop, not the pipeline's."""
        return self.refine is not None or self.policy == "composite"

    def _check_lean_pipeline(self) -> None:
        base = pipeline_base_class(self.pipe)
        what = "refine= (LLR)" if self.refine is not None else "policy 'composite'"
        if self.sampler is None:
            raise OptionError(
                f"{what} runs fusion_engine's own sampling loop, which drives {', '.join(LEAN_PIPELINES)} only, "
                f"not {base.__name__}: its own features would be ignored. Use a text-to-image pipeline, or drop {what}"
            )
        if getattr(self.denoiser, "encoder_hid_proj", None) is not None:
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
    def denoiser(self):
        """The wrapped pipeline's denoiser: ``pipe.unet`` (SD, SDXL) or ``pipe.transformer`` (FLUX, SD3)."""
        return getattr(self.pipe, denoiser_name(self.pipe))

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

    def default_size(self) -> int:
        """The pipeline's default image side in pixels."""
        sampler = self.sampler
        if sampler is not None:
            return sampler.default_size()
        return self.denoiser.config.sample_size * self.vae_scale_factor

    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor (FLUX: times 2 for packing; SD3: times the
        patch size)."""
        sampler = self.sampler
        return sampler.size_multiple() if sampler is not None else self.vae_scale_factor

    @property
    def sampler(self):
        """The lean loop's parts for this pipeline (``fusion_engine.samplers``), or None when it cannot drive it."""
        return sampler_for(self.pipe, pipeline_base_class(self.pipe))

    def __call__(self, prompt=None, negative_prompt=None, *, loras=None, pairs=None, progress: bool | None = None,
                 subject_prompt=None, style_prompt=None, reference_images=None, **kwargs):
        """Run the wrapped pipeline's call with the fusion attached; returns a ``FusionPipelineOutput``.

        Args:
            prompt, negative_prompt, **kwargs: the pipeline's own ``__call__`` arguments (every one, by keyword
                beyond these two), with the pipeline's defaults. ``return_dict=False`` returns the pipeline's
                tuple with the trace appended.
            loras: with ``pool`` only (and then required): the LoRAs of each prompt or of each image, e.g.
                ``[("dog", "watercolor"), ("cat", "pixel-art"), "cat"]``; checked against the pool before sampling.
            progress: show (True) or hide (False) the pipeline's progress bar for this call; None leaves the
                pipeline's setting.
            pairs: deprecated name of ``loras``.
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
        assignment = self._assignment(renamed_option(loras, pairs, "pairs", "loras"), kwargs)
        return_dict = kwargs.pop("return_dict", True)
        lean = self._lean_reason(kwargs)
        if lean is not None:
            output = self._lean_call(kwargs, progress, llr, lean, assignment)
        else:
            output = self._pipeline_call(kwargs, progress, assignment)
        output.loras = assignment
        if return_dict:
            return output
        own = output.pipeline_output.to_tuple() if output.pipeline_output is not None else (output.images,)
        return (*own, output.trace)

    def _assignment(self, loras, kwargs: dict) -> list[tuple[str, ...]] | None:
        """With a pool: each image's LoRA names, checked against the pool (``UnknownLoRAError``) and the call's
        prompts (``BatchLayoutError`` naming both counts) before anything runs. Without: None."""
        if self.pool is None:
            if loras is not None:
                raise OptionError("loras= names LoRAs per image from a pool, but this FusionPipeline fuses one "
                                  "subject/style pair: make it with FusionPipeline(pipe, pool=pool, ...)")
            return None
        if loras is None:
            raise OptionError("this FusionPipeline fuses a LoRA pool: pass loras=[...] with the prompts, one entry "
                              "per prompt or per image (a LoRA name or a tuple of names)")
        with_defaults = {"num_images_per_prompt": 1, **kwargs}
        return normalize_assignment(loras_per_image(loras, with_defaults), self.pool)

    def _attach(self, attach, target):
        """``attach`` (``attach_pipeline`` or ``attach_model``) of this pipeline's bank: its pair, or its pool."""
        return attach(target, self.subject, self.style, pool=self.pool, policy=self.policy, **self.attach_options)

    def _pipeline_call(self, kwargs: dict, progress: bool | None, assignment) -> FusionPipelineOutput:
        if assignment is not None:
            kwargs = {**kwargs, "loras": assignment}
        with _progress_bar(self.pipe, progress), self._attach(attach_pipeline, self.pipe) as fusion:
            result = self.pipe(**kwargs, return_dict=True)
        trace = fusion.trace
        if trace is not None:
            trace.gather()
        return FusionPipelineOutput(result.images, trace, None, result)

    def _lean_reason(self, kwargs: dict) -> str | None:
        """Why this call runs in the lean loop (named in its errors), or None for the pipeline's own call."""
        if self.uses_lean_loop:
            return "refine= (LLR)" if self.refine is not None else "policy 'composite'"
        if isinstance(self.sampler, FluxSampler) and uses_true_cfg(kwargs):
            return "FLUX true CFG (true_cfg_scale > 1 with a negative prompt, pooled per image in one batch)"
        return None

    def _lean_arguments(self, kwargs: dict, what: str) -> dict:
        """The call's arguments with the pipeline's own defaults, or an ``OptionError`` for one the loop lacks."""
        implemented = self.sampler.arguments
        unsupported = sorted(set(kwargs) - implemented)
        if unsupported:
            way_out = ("or use fe.attach(pipe, ..., granularity='sample') (each transformer call then decides alone)"
                       if what.startswith("FLUX") else f"or drop {what}")
            raise OptionError(
                f"{', '.join(unsupported)}: {what} runs fusion_engine's own sampling loop, which implements only "
                f"{', '.join(sorted(implemented))}; drop them, {way_out} (then every argument of "
                f"{pipeline_base_class(self.pipe).__name__}.__call__ is the pipeline's own)"
            )
        defaults = {name: parameter.default for name, parameter in call_signature(self.pipe).parameters.items()
                    if name in implemented and parameter.default is not inspect.Parameter.empty}
        arguments = {**defaults, **kwargs}
        check_call_arguments(arguments)
        return arguments

    @torch.no_grad()
    def _lean_call(self, kwargs: dict, progress: bool | None, llr: dict, what: str,
                   assignment=None) -> FusionPipelineOutput:
        """The lean loop: prompt encoding, latents, timesteps and decoding borrowed from the pipeline (its sampler)."""
        sampler = self.sampler
        args = self._lean_arguments(kwargs, what)
        prompt, num_inference_steps = args.get("prompt"), args["num_inference_steps"]
        args["num_images_per_prompt"], generator = args.get("num_images_per_prompt") or 1, args.get("generator")
        height, width = args.get("height") or sampler.default_size(), args.get("width") or sampler.default_size()
        prompts_list = [prompt] if isinstance(prompt, str) else list(prompt or [])
        images = images_in_batch(prompts_list, args["num_images_per_prompt"], args.get("negative_prompt"))
        conditioning = sampler.condition(prompts_list, args, height, width)
        initial_noise = sampler.initial_noise(images, height, width, generator, args.get("latents"), conditioning)
        refinement = None
        if self.refine is not None:  # before set_timesteps: the reference runs share this scheduler
            same_call = {name: value for name, value in args.items()
                         if name not in ("prompt", "latents", "generator", "output_type", "return_dict")}
            refinement = self.refine.start(self, noise=initial_noise, generator=generator, assignment=assignment, **llr,
                                           unpack=lambda x: sampler.unpack(x, height, width),
                                           **{**same_call, "height": height, "width": width})
        timesteps = sampler.set_timesteps(num_inference_steps, initial_noise)
        latents = sampler.scale_initial_noise(initial_noise)
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        show = progress if progress is not None else not getattr(self.pipe, "_progress_bar_config", {}).get("disable")
        composite = self.policy == "composite"

        fusion = self._attach(attach_model, sampler.denoiser)
        try:
            fusion.set_batch_layout(images, conditioning.copies)
            if assignment is not None:
                fusion.set_loras(assignment)
            bar = tqdm(timesteps, desc=f"fusion {fusion.policy.describe()}", disable=not show, leave=False)
            for step, t in enumerate(bar):
                fusion.set_step(step, len(timesteps))
                if refinement is not None and refinement.active(step, len(timesteps)):
                    def predict(x, t=t):
                        return sampler.predict(fusion, x, t, conditioning, composite)

                    latents = refinement.step(fusion, latents, t, predict, step_kwargs)
                    continue
                output = sampler.predict(fusion, latents, t, conditioning, composite)
                latents = self.scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]
        finally:
            fusion.detach()
        trace = fusion.trace
        if trace is not None:
            trace.gather()
        references = refinement.reference_images if refinement is not None else None
        images_out = sampler.decode(latents, args.get("output_type", "pil"), height, width)
        return FusionPipelineOutput(images_out, trace, references)

    def decode(self, latents: torch.Tensor, output_type: str = "pil", height: int | None = None,
               width: int | None = None):
        """Latents as the lean loop returns them -> images, as the pipeline decodes them (``height``/``width``:
        the image size, needed to unpack FLUX latents; default the pipeline's)."""
        sampler = self.sampler
        size = sampler.default_size()
        return sampler.decode(latents, output_type, height or size, width or size)


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
