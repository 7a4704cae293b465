"""Subject-style pairs for ``fusion-engine eval``: read from pairs.toml, or made on the tiny default world.

pairs.toml (paths relative to the file):

    [[pair]]
    name = "dog-watercolor"                 # unique; used in file names
    subject = "loras/dog.safetensors"
    style = "loras/watercolor.safetensors"
    prompt = "a sbu dog in szn style"       # the fused prompt
    subject_prompt = "a photo of sbu dog"   # Ic: the subject LoRA alone (LLR reference, CLIP/DINO Score)
    style_prompt = "a painting in szn style"
    # optional, instead of generated references (e.g. the DreamBooth / StyleDrop images):
    # subject_image = "refs/dog.png"
    # style_image = "refs/watercolor.png"
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REQUIRED = ("name", "subject", "style", "prompt", "subject_prompt", "style_prompt")


@dataclass(frozen=True)
class Pair:
    name: str
    subject: Path
    style: Path
    prompt: str
    subject_prompt: str
    style_prompt: str
    subject_image: Path | None = None
    style_image: Path | None = None

    @property
    def has_reference_images(self) -> bool:
        return self.subject_image is not None and self.style_image is not None


def load_pairs(path) -> list[Pair]:
    path = Path(path)
    with path.open("rb") as handle:
        data = tomllib.load(handle)
    entries = data.get("pair")
    if not entries:
        raise ValueError(f"{path}: no [[pair]] tables")
    pairs, names = [], set()
    for index, entry in enumerate(entries):
        missing = [key for key in REQUIRED if key not in entry]
        if missing:
            raise ValueError(f"{path}: pair {index} lacks {', '.join(missing)}")
        name = str(entry["name"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise ValueError(f"{path}: pair name {name!r} must be unique and use only letters, digits, _ . -")
        names.add(name)
        if ("subject_image" in entry) != ("style_image" in entry):
            raise ValueError(f"{path}: pair {name!r} gives one reference image; give both or neither")

        def resolve(key):
            return (path.parent / entry[key]).resolve() if key in entry else None

        pairs.append(Pair(name, resolve("subject"), resolve("style"), entry["prompt"], entry["subject_prompt"],
                          entry["style_prompt"], resolve("subject_image"), resolve("style_image")))
    return pairs


def write_default_pairs(folder, count: int, unet=None) -> Path:
    """``count`` pairs of random LoRAs for the tiny default world, and their pairs.toml.

    Sharded runs call this in every process: files are written aside and moved in atomically (their bytes
    are deterministic), so no process ever reads a half-written file.
    """
    from .default import FUSED_PROMPT, STYLE_PROMPT, SUBJECT_PROMPT, build_tiny_pipeline, default_loras
    from .lora import save_lora

    folder = Path(folder)
    scratch = folder / f".writing-{os.getpid()}"
    scratch.mkdir(parents=True, exist_ok=True)
    unet = unet if unet is not None else build_tiny_pipeline(0).unet
    lines = []
    for index in range(count):
        subject, style = default_loras(unet, seed=10 * index)
        save_lora(subject, scratch / f"subject_{index}.safetensors", layout="peft")
        save_lora(style, scratch / f"style_{index}.safetensors", layout="kohya")
        lines += ["[[pair]]", f'name = "tiny{index}"', f'subject = "subject_{index}.safetensors"',
                  f'style = "style_{index}.safetensors"', f'prompt = "{FUSED_PROMPT}"',
                  f'subject_prompt = "{SUBJECT_PROMPT}"', f'style_prompt = "{STYLE_PROMPT}"', ""]
    (scratch / "pairs.toml").write_text("\n".join(lines))
    for file in sorted(scratch.iterdir(), key=lambda f: f.name == "pairs.toml"):  # pairs.toml last
        os.replace(file, folder / file.name)
    shutil.rmtree(scratch, ignore_errors=True)
    return folder / "pairs.toml"
