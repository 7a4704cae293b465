"""The embedded defaults behind one seam, ``load_default_world``:

* ``"toy"``: the trained toy world shipped in ``fusion_engine/toy/weights`` (a tiny text-to-image model of
  16x16 shapes x styles, a trained subject LoRA and a trained style LoRA; see ``fusion_engine.toy``);
* ``"random"``: a tiny SD-style pipeline and two LoRA files of random weights, built here with fixed seeds
  (what the unit tests use: fast, and no file needed).

``"auto"`` (the default) is the toy world when its weights are present, else the random one.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ..lora import LoRA, LoRALayer, load_lora, save_lora

SUBJECT_PROMPT = "a photo of sbu dog"
STYLE_PROMPT = "a painting in szn style"
FUSED_PROMPT = "a sbu dog in szn style"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _config(name: str) -> dict:
    return json.loads(resources.files(__package__).joinpath("configs", f"{name}.json").read_text())


def assemble_pipeline(configs: dict):
    """A StableDiffusionPipeline (Euler, offline CLIP tokenizer) from ``vae``/``unet``/``text_encoder``/
    ``scheduler`` config dicts; the models are freshly initialised (load weights into them afterwards)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from .tokenizer import clip_tokenizer

    unet = UNet2DConditionModel(**configs["unet"])
    vae = AutoencoderKL(**configs["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=clip_tokenizer(), unet=unet,
        scheduler=EulerDiscreteScheduler(**configs["scheduler"]),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of ~2M random parameters that runs on a CPU in milliseconds a step."""
    torch.manual_seed(seed)
    return assemble_pipeline({name: _config(name) for name in ("unet", "vae", "text_encoder", "scheduler")})


def attention_targets(unet, skip: tuple[str, ...] = ()) -> list[str]:
    """Module paths of every attention projection (the paper's LoRA targets), minus ``skip`` prefixes."""
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS):
            if ".attn" in name and not name.startswith(skip):
                names.append(name)
    return names


def random_lora(unet, targets, rank: int, alpha: float, strength: float, seed: int) -> LoRA:
    """A LoRA with Gaussian factors whose delta is ``strength`` times the layer's weight scale."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for name in targets:
        weight = unet.get_submodule(name).weight
        out_features, in_features = weight.shape
        lora_a = torch.randn(rank, in_features, generator=generator) / in_features**0.5
        lora_b = torch.randn(out_features, rank, generator=generator) * (strength * weight.std().item() / rank**0.5)
        layers[name] = LoRALayer(lora_a=lora_a, lora_b=lora_b * (rank / alpha), alpha=alpha)
    return LoRA(layers=layers, source="<random>", layout="peft")


def default_loras(unet, seed: int = 0) -> tuple[LoRA, LoRA]:
    """Subject: rank 4 on every attention projection. Style: rank 8, alpha 4 (alpha != rank, as in
    the wild), on every projection but the mid block's, so some layers fuse with one LoRA absent."""
    subject = random_lora(unet, attention_targets(unet), rank=4, alpha=4.0, strength=3.0, seed=seed + 1)
    style = random_lora(unet, attention_targets(unet, skip=("mid_block",)), rank=8, alpha=4.0, strength=3.0,
                        seed=seed + 2)
    return subject, style


@dataclass
class DefaultWorld:
    pipe: object
    subject_path: Path
    style_path: Path
    subject_prompt: str = SUBJECT_PROMPT
    style_prompt: str = STYLE_PROMPT
    prompt: str = FUSED_PROMPT

    def subject(self) -> LoRA:
        return load_lora(self.subject_path)

    def style(self) -> LoRA:
        return load_lora(self.style_path)


def resolve_world(world: str = "auto") -> str:
    if world not in ("auto", "toy", "random"):
        raise ValueError(f"unknown default world {world!r}: use 'auto', 'toy' or 'random'")
    if world == "auto":
        from ..toy.world import toy_weights_present

        return "toy" if toy_weights_present() else "random"
    return world


def load_default_world(folder, seed: int = 0, world: str = "auto") -> DefaultWorld:
    """The toy world (its LoRA files are read where they ship; ``folder`` is unused), or the random one:
    build the tiny pipeline and write its LoRAs as real files, subject in the diffusers (PEFT) layout,
    style in the kohya layout, so the demo loads both through the normal path."""
    if resolve_world(world) == "toy":
        from ..toy.world import load_toy_world

        return load_toy_world()
    folder = Path(folder)
    pipe = build_tiny_pipeline(seed)
    subject, style = default_loras(pipe.unet, seed)
    subject_path = save_lora(subject, folder / "subject_sbu_dog.safetensors", layout="peft")
    style_path = save_lora(style, folder / "style_szn_kohya.safetensors", layout="kohya")
    return DefaultWorld(pipe, subject_path, style_path)
