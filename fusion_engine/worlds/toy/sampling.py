"""Sampling the toy world many seeds at a time: image i of a batch is exactly the image a one-image call with
``torch.Generator().manual_seed(seeds[i])`` makes (its initial latents are drawn from that generator; the
Euler sampler draws nothing else), so batched and one-by-one runs, the demo, the gates and the eval share seeds."""
from __future__ import annotations

import torch

from ...errors import OptionError
from ..base import seed_latents
from .world import DEMO_GUIDANCE, DEMO_STEPS

ROLES = ("base", "subject", "style", "both")


def sample(world, role: str, seeds, *, prompt: str | None = None, policy: str = "direct", steps: int = DEMO_STEPS,
           guidance: float = DEMO_GUIDANCE, chunk: int = 50, refine=None, subject=None, style=None, **options):
    """PIL images, one per seed. ``role``: "base" (no LoRA), "subject" / "style" (that LoRA alone, at full
    strength) or "both" (fused by ``policy``). The prompt defaults to the role's own: the subject prompt, the
    style prompt, or the fused prompt for "base" and "both"."""
    from ...integration.pipeline import FusionPipeline

    if role not in ROLES:
        raise OptionError(f"unknown role {role!r}: use one of {ROLES}")
    subject = subject if subject is not None else (world.subject() if role in ("subject", "both") else None)
    style = style if style is not None else (world.style() if role in ("style", "both") else None)
    if role == "subject":
        style = None
    if role == "style":
        subject = None
    if role == "base":  # a LoRA whose one delta is zero: the pipeline runs, the model is the base model's
        subject, style = _null_lora(world.pipe.unet), None
    prompt = prompt or {"subject": world.subject_prompt, "style": world.style_prompt}.get(role, world.prompt)
    if role != "both":
        policy = "direct"
    if policy == "direct":
        options.setdefault("weights", (1.0, 1.0))
    pipe = FusionPipeline.from_pipe(world.pipe, subject=subject, style=style, policy=policy, trace=False,
                                    refine=refine, **options)
    extra = {"subject_prompt": world.subject_prompt, "style_prompt": world.style_prompt} if refine else {}
    seeds = list(seeds)
    images = []
    for start in range(0, len(seeds), chunk):
        part = seeds[start:start + chunk]
        latents = seed_latents(world.pipe, part)
        images += pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=len(part),
                       latents=latents, generator=torch.Generator().manual_seed(int(part[0])), progress=False,
                       **extra).images
    return images


def _null_lora(unet):
    from ...lora import LoRA, LoRALayer

    name = next(n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith("to_q"))
    weight = unet.get_submodule(name).weight
    layer = LoRALayer(lora_a=torch.zeros(1, weight.shape[1]), lora_b=torch.zeros(weight.shape[0], 1), alpha=1.0)
    return LoRA(layers={name: layer}, source="<zero>", layout="peft")
