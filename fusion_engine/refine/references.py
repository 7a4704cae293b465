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


def generate_references(pipeline, subject_prompt, style_prompt, *, noise, generator, assignment=None,
                        **call_options):
    """Ic and Is sampled by ``pipeline``'s own sampler from the same initial noise as the fused run, each with
    one LoRA alone (policy "direct"), as (B, 3, H, W) float tensors in [0, 1]. A pool pipeline: each image's first
    LoRA alone, then its second (``assignment``: each image's names, a (subject, style) pair each); a prompt given
    as one string serves every prompt."""
    if subject_prompt is None or style_prompt is None:
        raise OptionError("LLR needs the reference images: pass subject_prompt= and style_prompt= (the single-LoRA "
                         "prompts of Eqs. 14-15) or reference_images=(subject_image, style_image)")
    pool = getattr(pipeline, "pool", None)
    if pool is None and (pipeline.subject is None or pipeline.style is None):
        raise OptionError("generating LLR references needs both LoRAs; pass reference_images= instead")
    if pool is not None and any(len(names) != 2 for names in assignment):
        raise OptionError(f"generating LLR references with a pool needs each image to name a (subject, style) pair, "
                          f"got {assignment!r:.120}; pass reference_images= instead")
    backend = pipeline.attach_options.get("backend", "auto")
    prompts = len(assignment or ()) // (call_options.get("num_images_per_prompt") or 1)
    images = []
    for position, (role, prompt) in enumerate((("subject", subject_prompt), ("style", style_prompt))):
        if pool is None:
            loras = {"subject": pipeline.subject if role == "subject" else None,
                     "style": pipeline.style if role == "style" else None}
        else:
            loras = {"pool": pool, "loras": [(names[position],) for names in assignment]}
            prompt = [prompt] * prompts if isinstance(prompt, str) else prompt
        bank = {name: value for name, value in loras.items() if name != "loras"}
        single = type(pipeline)(pipeline.pipe, policy="direct", backend=backend, trace=False, **bank)
        per_image = {"loras": loras["loras"]} if "loras" in loras else {}
        result = single(prompt, latents=noise, generator=clone_generator(generator), output_type="pt",
                        progress=False, **per_image, **call_options)
        images.append(result.images)
    return tuple(images)


def user_references(reference_images) -> tuple[torch.Tensor, torch.Tensor]:
    """(subject, style) given as PIL images, lists of them, or tensors in [0, 1] -> two (B, 3, H, W) tensors."""
    try:
        subject, style = reference_images
    except (TypeError, ValueError) as error:
        raise OptionError("reference_images must be a pair (subject_image, style_image)") from error
    return as_image_tensor(subject), as_image_tensor(style)
