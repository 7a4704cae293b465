"""The two reference images of LLR: Ic (subject LoRA alone) and Is (style LoRA alone), or the user's own."""
from __future__ import annotations

import torch

from ..errors import OptionError
from ..scoring.metrics import as_image_tensor


def clone_generator(generator):
    """A copy with the same state, so reference sampling never advances the caller's generator."""
    if generator is None:
        return None
    if isinstance(generator, (list, tuple)):
        return [clone_generator(g) for g in generator]
    copy = torch.Generator(device=generator.device)
    copy.set_state(generator.get_state())
    return copy


def generate_references(pipeline, subject_prompt, style_prompt, *, noise, generator, **call_options):
    """Ic and Is sampled by ``pipeline``'s own sampler from the same initial noise as the fused run, each with
    one LoRA alone (policy "direct"), as (B, 3, H, W) float tensors in [0, 1]."""
    if subject_prompt is None or style_prompt is None:
        raise OptionError("LLR needs the reference images: pass subject_prompt= and style_prompt= (the single-LoRA "
                         "prompts of Eqs. 14-15) or reference_images=(subject_image, style_image)")
    if pipeline.subject is None or pipeline.style is None:
        raise OptionError("generating LLR references needs both LoRAs; pass reference_images= instead")
    backend = pipeline.attach_options.get("backend", "auto")
    images = []
    for role, prompt in (("subject", subject_prompt), ("style", style_prompt)):
        loras = {"subject": pipeline.subject if role == "subject" else None,
                 "style": pipeline.style if role == "style" else None}
        single = type(pipeline)(pipeline.pipe, policy="direct", backend=backend, trace=False, **loras)
        result = single(prompt, latents=noise, generator=clone_generator(generator), output_type="pt",
                        progress=False, **call_options)
        images.append(result.images)
    return tuple(images)


def user_references(reference_images) -> tuple[torch.Tensor, torch.Tensor]:
    """(subject, style) given as PIL images, lists of them, or tensors in [0, 1] -> two (B, 3, H, W) tensors."""
    try:
        subject, style = reference_images
    except (TypeError, ValueError) as error:
        raise OptionError("reference_images must be a pair (subject_image, style_image)") from error
    return as_image_tensor(subject), as_image_tensor(style)
