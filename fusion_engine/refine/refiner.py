"""Refiner: Latent-Level Refinement (docs/METHOD.md, Part 2; arXiv 2602.15539) as a FusionPipeline hook.

    refiner = Refiner(clip=load_openclip("ViT-L-14", "clip.safetensors"),
                      dino=load_dino("vit_base_patch16_224.dino", "dino.safetensors"), m=10.0)
    pipe = FusionPipeline(sd, subject, style, policy="fls", refine=refiner)
    out = pipe("a sbu dog in szn style", subject_prompt="a photo of sbu dog",
               style_prompt="a painting in szn style", generator=torch.Generator().manual_seed(0))
    out.references  # (Ic, Is), the images R was measured against

At every step (inside ``step_window``): x0_hat from x_t and the fused, CFG-combined model output (noise,
v or, for FLUX/SD3 flow matching, the velocity: x0_hat = x_t - sigma_t * v); decode;
S1 = cos(CLIP(Ic), CLIP(img)), S2 = cos(CLIP(Is), CLIP(img)), S3 = cos(DINO(Is), DINO(img));
R = 1 - (S1 + S2 + S3) / 3; x_{t-1} = scheduler_step(x_t) - m * grad_{x_t} R.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import OptionError
from .compiled import CompiledOrEager, wants_compile
from .gradient import shape_gradient
from .references import generate_references, user_references
from .reward import ReferenceEmbeddings, llr_objective
from .x0 import predict_x0


class Refiner:
    """LLR settings and encoders; reusable across calls and pipelines.

    ``clip``, ``dino``: ``ImageEncoder``s (``fusion_engine.scoring.encoders``). ``m``: step size (paper: 10).
    ``through_unet``: the gradient flows through the UNet (default, what grad_{x_t} says); False treats the
    noise prediction as a constant (cheaper: no UNet backward). ``normalize`` / ``clip_grad``: optional
    gradient shaping (off, as in the paper). ``step_window=(start, end)``: guide only while
    start <= step / num_steps < end. ``dino_reference``: "style" (the paper's S3) or "subject".
    ``compile``: True, False or "auto" (CUDA only) for the score (VAE decode + encoders + R).
    ``guided_backend``: fused-op backend during the guided forward and its backward; "reference" (default)
    is pure torch autograd, so a Triton fusion falls back to it for these passes; None keeps the fusion's.
    ``gradient_checkpointing``: recompute UNet and VAE-decoder activations in the backward instead of storing
    them (the decoder's are the larger part at 512 px and up).
    """

    def __init__(self, clip, dino, m: float = 10.0, *, through_unet: bool = True, normalize: bool = False,
                 clip_grad: float | None = None, step_window: tuple[float, float] | None = None,
                 dino_reference: str = "style", compile="auto", guided_backend: str | None = "reference",
                 gradient_checkpointing: bool = False):
        if dino_reference not in ("style", "subject"):
            raise OptionError(f"dino_reference must be 'style' or 'subject', got {dino_reference!r}")
        if step_window is not None and not 0.0 <= step_window[0] <= step_window[1] <= 1.0:
            raise OptionError(f"step_window must be (start, end) with 0 <= start <= end <= 1, got {step_window}")
        wants_compile(compile, torch.device("cpu"))  # validates the value
        self.clip, self.dino, self.m = clip, dino, float(m)
        self.through_unet, self.normalize, self.clip_grad = through_unet, normalize, clip_grad
        self.step_window, self.dino_reference = step_window, dino_reference
        self.compile, self.guided_backend = compile, guided_backend
        self.gradient_checkpointing = gradient_checkpointing
        self._objective: CompiledOrEager | None = None
        self._objective_vae = None

    def __repr__(self) -> str:
        return (f"Refiner(m={self.m:g}, through_unet={self.through_unet}, dino_reference={self.dino_reference!r}, "
                f"step_window={self.step_window}, compile={self.compile!r})")

    def objective(self, vae, device) -> CompiledOrEager:
        """The score function, compiled once per Refiner and VAE (a failure switches it to eager for good)."""
        if self._objective is None or self._objective_vae is not vae:
            clip, dino = self.clip, self.dino

            def score(x0, clip_subject, clip_style, dino_reference):
                return llr_objective(vae, clip, dino, x0, ReferenceEmbeddings(clip_subject, clip_style, dino_reference))

            self._objective = CompiledOrEager(score, wants_compile(self.compile, device))
            self._objective_vae = vae
        return self._objective

    def start(self, pipeline, *, noise, generator, subject_prompt=None, style_prompt=None, reference_images=None,
              unpack=None, assignment=None, **call_options) -> Refinement:
        """Make (or take) the references and embed them; called by FusionPipeline before fusion sampling.

        Args:
            unpack: the sampler's latents -> (B, C, h, w) VAE latents (FLUX's packed tokens); None: as they are.
            assignment: a pool pipeline's LoRA names per image (each a (subject, style) pair).
            call_options: the fused call's own arguments, so the references run the same sampler.
        """
        unpack = unpack if unpack is not None else _same
        if reference_images is not None:
            subject_images, style_images = user_references(reference_images)
        else:
            subject_images, style_images = generate_references(
                pipeline, subject_prompt, style_prompt, noise=noise, generator=generator, assignment=assignment,
                **call_options)
        references = ReferenceEmbeddings.of(self.clip, self.dino, subject_images, style_images, len(noise),
                                            self.dino_reference)
        objective = self.objective(pipeline.vae, noise.device)
        objective.warm_up(unpack(noise), references.clip_subject, references.clip_style, references.dino)
        return Refinement(self, pipeline, references, objective, (subject_images, style_images), unpack)


@dataclass
class Refinement:
    """One sampling call's LLR state: the references, their embeddings and the score function."""

    refiner: Refiner
    pipeline: object
    references: ReferenceEmbeddings
    objective: CompiledOrEager
    reference_images: tuple
    unpack: object = None  # sampler latents -> VAE latents (FLUX: unpack the 2x2 tokens); None: as they are

    def active(self, step: int, num_steps: int) -> bool:
        window = self.refiner.step_window
        return window is None or window[0] <= step / num_steps < window[1]

    def step(self, fusion, latents: torch.Tensor, t, predict_noise, step_kwargs: dict) -> torch.Tensor:
        """x_{t-1} = scheduler_step(x_t) - m * grad_{x_t} R(x0_hat(x_t))."""
        refiner, scheduler = self.refiner, self.pipeline.scheduler
        refs = self.references
        with torch.enable_grad(), self._guided_forward(fusion):
            x = latents.detach().requires_grad_(True)
            if refiner.through_unet:
                noise = predict_noise(x)
            else:
                with torch.no_grad():
                    noise = predict_noise(latents)
            x0 = predict_x0(scheduler, x, noise, t)
            if self.unpack is not None:
                x0 = self.unpack(x0)
            objective, _scores = self.objective(x0, refs.clip_subject, refs.clip_style, refs.dino)
            with _trace_paused(fusion):  # checkpoint recomputation must not record the step twice
                (grad,) = torch.autograd.grad(objective.sum(), x)
        grad = shape_gradient(grad, refiner.normalize, refiner.clip_grad)
        previous = scheduler.step(noise.detach(), t, latents, **step_kwargs, return_dict=False)[0]
        return previous - refiner.m * grad.to(previous.dtype)

    @contextmanager
    def _guided_forward(self, fusion):
        """For this step only: the reference backend (autograd), denoiser/VAE gradient checkpointing if asked, and
        frozen denoiser/VAE weights (nothing trains; weight-gradient bookkeeping would only hold memory)."""
        refiner, models = self.refiner, (self.pipeline.denoiser, self.pipeline.vae)
        context, backend = fusion.context, fusion.context.backend
        trainable = [p for model in models for p in model.parameters() if p.requires_grad]
        for parameter in trainable:
            parameter.requires_grad_(False)
        checkpointed = []
        if refiner.gradient_checkpointing:
            checkpointed = [m for m in models if getattr(m, "_supports_gradient_checkpointing", False)
                            and not m.is_gradient_checkpointing]
            for model in checkpointed:
                model.enable_gradient_checkpointing()
        if refiner.guided_backend is not None:
            context.backend = refiner.guided_backend
        try:
            yield
        finally:
            context.backend = backend
            for model in checkpointed:
                model.disable_gradient_checkpointing()
            for parameter in trainable:
                parameter.requires_grad_(True)


def _same(latents):
    return latents


@contextmanager
def _trace_paused(fusion):
    context = fusion.context
    trace, context.trace = context.trace, None
    try:
        yield
    finally:
        context.trace = trace
