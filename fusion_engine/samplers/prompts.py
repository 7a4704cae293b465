"""Prompt encoding borrowed from the diffusers pipeline we wrap (SD 1.x/2.x and SDXL)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PromptBatch:
    """Text conditioning for the UNet, CFG-stacked as ``[uncond..., cond...]`` when guided."""

    embeds: torch.Tensor
    added_cond_kwargs: dict | None = None


def is_sdxl(pipe) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None or hasattr(pipe, "_get_add_time_ids")


def encode_prompts(pipe, prompt, negative_prompt, images_per_prompt: int, guided: bool, height: int, width: int):
    device = pipe.unet.device
    if not is_sdxl(pipe):
        cond, uncond = pipe.encode_prompt(
            prompt, device, images_per_prompt, guided, negative_prompt=negative_prompt
        )
        return PromptBatch(torch.cat([uncond, cond]) if guided else cond)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(
        prompt=prompt, device=device, num_images_per_prompt=images_per_prompt,
        do_classifier_free_guidance=guided, negative_prompt=negative_prompt,
    )
    projection_dim = int(pooled.shape[-1])
    time_ids = pipe._get_add_time_ids((height, width), (0, 0), (height, width), cond.dtype, projection_dim)
    time_ids = time_ids.to(device).repeat(cond.shape[0], 1)
    if guided:
        cond, pooled = torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled])
        time_ids = torch.cat([time_ids, time_ids])
    return PromptBatch(cond, {"text_embeds": pooled, "time_ids": time_ids})
