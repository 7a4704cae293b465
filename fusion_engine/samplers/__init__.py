"""The lean sampling loop's per-family parts (what ``FusionPipeline`` runs for LLR, composite and FLUX true CFG).

``sampler_for(pipe)`` picks the family from the pipeline's own class: ``UNetSampler`` (SD 1.x/2.x, SDXL),
``FluxSampler`` (FLUX), ``SD3Sampler`` (Stable Diffusion 3), or None when the lean loop cannot drive it.
"""
from __future__ import annotations

from .base import Conditioning, Sampler
from .flux import FluxSampler, uses_true_cfg
from .sd3 import SD3Sampler
from .unet import UNetSampler

SAMPLERS = (UNetSampler, FluxSampler, SD3Sampler)
LEAN_PIPELINES = tuple(name for sampler in SAMPLERS for name in sampler.pipelines)


def sampler_for(pipe, base_class: type) -> Sampler | None:
    """The lean-loop sampler for ``pipe``, or None when no sampler drives its class.

    Args:
        pipe: a diffusers pipeline object.
        base_class: the pipeline's own class (``integration.pipeline_base_class(pipe)``: an attached pipeline's
            class is a same-named subclass); matched by name along its MRO.

    Example:
        ```py
        >>> sampler = sampler_for(flux_pipe, type(flux_pipe))
        >>> conditioning = sampler.condition(["a dog"], {"num_images_per_prompt": 1, "guidance_scale": 3.5}, 1024, 1024)
        ```
    """
    names = {cls.__name__ for cls in base_class.__mro__}
    for sampler in SAMPLERS:
        if names & set(sampler.pipelines):
            return sampler(pipe)
    return None


__all__ = ["LEAN_PIPELINES", "SAMPLERS", "Conditioning", "FluxSampler", "SD3Sampler", "Sampler", "UNetSampler",
           "sampler_for", "uses_true_cfg"]
