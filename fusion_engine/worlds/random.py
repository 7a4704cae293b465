"""The random world: a tiny SD-style pipeline (~2M parameters, configs in ``configs/``) and LoRAs of random
weights, all built here with fixed seeds. Fast, and no file needed: what the unit tests use.
"""
from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import torch

from ..lora import LoRA, LoRALayer, save_lora
from ..utils.io import write_text
from .base import World, assemble_pipeline

RANDOM_SUBJECT_PROMPT = "a photo of sbu dog"
RANDOM_STYLE_PROMPT = "a painting in szn style"
RANDOM_FUSED_PROMPT = "a sbu dog in szn style"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")


def _config(name: str) -> dict:
    return json.loads(resources.files(__package__).joinpath("configs", f"{name}.json").read_text())


def build_tiny_pipeline(seed: int = 0):
    """A StableDiffusionPipeline of ~2M random parameters that runs on a CPU in milliseconds a step."""
    torch.manual_seed(seed)
    return assemble_pipeline({name: _config(name) for name in ("unet", "vae", "text_encoder", "scheduler")})


def attention_targets(unet, skip: tuple[str, ...] = ()) -> list[str]:
    """Module paths of every attention projection (the paper's LoRA targets), minus ``skip`` prefixes."""
    names = []
    for name, module in unet.named_modules():
        is_projection = isinstance(module, torch.nn.Linear) and name.endswith(ATTENTION_PROJECTIONS)
        if is_projection and ".attn" in name and not name.startswith(skip):
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


def load_random_world(folder, seed: int = 0) -> World:
    """Build the tiny pipeline and write its LoRAs as real files, subject in the diffusers (PEFT) layout,
    style in the kohya layout, so the demo loads both through the normal path."""
    folder = Path(folder)
    pipe = build_tiny_pipeline(seed)
    subject, style = default_loras(pipe.unet, seed)
    subject_path = save_lora(subject, folder / "subject_sbu_dog.safetensors", layout="peft")
    style_path = save_lora(style, folder / "style_szn_kohya.safetensors", layout="kohya")
    return World(pipe, subject_path, style_path, RANDOM_SUBJECT_PROMPT, RANDOM_STYLE_PROMPT, RANDOM_FUSED_PROMPT)


def write_random_pairs(folder, count: int, unet=None) -> Path:
    """``count`` pairs of random LoRAs (for ``unet``, default: the tiny pipeline's) and their pairs.toml, for
    ``fusion-engine eval`` when no pairs are given.

    Sharded runs call this in every process: each file is written aside and renamed in (its bytes are
    deterministic), pairs.toml last, so no process ever reads a half-written file.
    """
    folder = Path(folder)
    unet = unet if unet is not None else build_tiny_pipeline(0).unet
    lines = []
    for index in range(count):
        subject, style = default_loras(unet, seed=10 * index)
        save_lora(subject, folder / f"subject_{index}.safetensors", layout="peft")
        save_lora(style, folder / f"style_{index}.safetensors", layout="kohya")
        lines += ["[[pair]]", f'name = "tiny{index}"', f'subject = "subject_{index}.safetensors"',
                  f'style = "style_{index}.safetensors"', f'prompt = "{RANDOM_FUSED_PROMPT}"',
                  f'subject_prompt = "{RANDOM_SUBJECT_PROMPT}"', f'style_prompt = "{RANDOM_STYLE_PROMPT}"', ""]
    write_text(folder / "pairs.toml", "\n".join(lines))
    return folder / "pairs.toml"
