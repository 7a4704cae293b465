"""What every embedded world is made of: the ``World`` record and the pipeline assembler they share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..lora import LoRA, load_lora


@dataclass
class World:
    """A base pipeline, a subject and a style LoRA file, and the three prompts that go with them."""

    pipe: object
    subject_path: Path
    style_path: Path
    subject_prompt: str
    style_prompt: str
    prompt: str

    def subject(self) -> LoRA:
        return load_lora(self.subject_path)

    def style(self) -> LoRA:
        return load_lora(self.style_path)


def assemble_pipeline(configs: dict):
    """A StableDiffusionPipeline (Euler, offline CLIP tokenizer) from ``vae``/``unet``/``text_encoder``/
    ``scheduler`` config dicts; the models are freshly initialised (load weights into them afterwards). An
    optional ``tokenizer`` entry ``{"words": [...]}`` gives a world-sized vocabulary (``world_tokenizer``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import clip_tokenizer, world_tokenizer

    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, unet=unet,
        tokenizer=world_tokenizer(configs["tokenizer"]["words"]) if "tokenizer" in configs else clip_tokenizer(),
        scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seed_latents(pipe, seeds):
    """Initial latents for a batch whose image i is exactly what a one-image call with
    ``torch.Generator().manual_seed(seeds[i])`` draws, so batched and one-by-one runs share seeds."""
    import torch

    size = pipe.unet.config.sample_size
    shape = (1, pipe.unet.config.in_channels, size, size)
    return torch.cat([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
