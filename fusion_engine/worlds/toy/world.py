"""Load the toy world from the weights shipped in ``fusion_engine/worlds/toy/weights`` (no download, no training)."""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import ModelPathError
from ...utils.io import write_text
from .data import FUSED_PROMPT, STYLE_PROMPT, SUBJECT_PROMPT

WEIGHTS = Path(__file__).parent / "weights"
SUBJECT_FILE = "subject_sks_mushroom_peft.safetensors"
STYLE_FILE = "style_zzt_kohya.safetensors"
CLIP_FILE, DINO_FILE = "judge_clip.safetensors", "judge_dino.safetensors"
GATES_FILE = "gates.json"
BASE_FILES = ("base_config.json", "vae.safetensors", "unet.safetensors", "text_encoder.safetensors")
# The demo's sampler settings; the gates in the card are measured at these.
DEMO_STEPS, DEMO_GUIDANCE = 20, 5.0


def toy_weights_present(folder=WEIGHTS) -> bool:
    folder = Path(folder)
    return all((folder / name).is_file() for name in (*BASE_FILES, SUBJECT_FILE, STYLE_FILE))


def build_toy_pipeline(folder=WEIGHTS):
    """The trained StableDiffusionPipeline (32x32 images, Euler sampler)."""
    from safetensors.torch import load_file

    from ..base import assemble_pipeline

    folder = Path(folder)
    pipe = assemble_pipeline(json.loads((folder / "base_config.json").read_text()))
    for name in ("vae", "unet", "text_encoder"):
        getattr(pipe, name).load_state_dict(load_file(str(folder / f"{name}.safetensors")))
        getattr(pipe, name).eval().requires_grad_(False)
    return pipe


def load_toy_world(folder=WEIGHTS, require_loras: bool = True):
    """A ``World`` over the shipped files: the LoRAs are read from where they ship."""
    from ..base import World

    folder = Path(folder)
    if require_loras and not toy_weights_present(folder):
        raise ModelPathError(f"{folder}: the toy world's weights are not all there (train them: see CARD.md)")
    return World(build_toy_pipeline(folder), folder / SUBJECT_FILE, folder / STYLE_FILE,
                        subject_prompt=SUBJECT_PROMPT, style_prompt=STYLE_PROMPT, prompt=FUSED_PROMPT)


def load_judges(folder=WEIGHTS, device="cpu"):
    """(clip, dino): the trained judges, loaded through ``fusion_engine.scoring.encoders`` like the big backbones."""
    from ...scoring.encoders import IMAGENET_MEAN, IMAGENET_STD, load_dino, load_openclip
    from . import configs

    folder = Path(folder)
    clip = load_openclip(configs.CLIP, folder / CLIP_FILE, device=device)
    dino = load_dino(configs.DINO_NAME, folder / DINO_FILE, device=device, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                     **configs.DINO_OPTIONS)
    return clip, dino


def load_gates(folder=WEIGHTS) -> dict:
    return json.loads((Path(folder) / GATES_FILE).read_text())


def write_toy_pairs(folder, weights=WEIGHTS) -> Path:
    """pairs.toml for ``fusion-engine eval``: the toy world's one subject-style pair, LoRAs where they ship."""
    weights = Path(weights).resolve()
    lines = ["[[pair]]", 'name = "sks-mushroom_zzt"', f'subject = "{weights / SUBJECT_FILE}"',
             f'style = "{weights / STYLE_FILE}"', f'prompt = "{FUSED_PROMPT}"',
             f'subject_prompt = "{SUBJECT_PROMPT}"', f'style_prompt = "{STYLE_PROMPT}"', ""]
    return write_text(Path(folder) / "pairs.toml", "\n".join(lines))
