"""Subject-style pairs for ``fusion-engine eval``, read from pairs.toml.

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

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import OptionError

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
        raise OptionError(f"{path}: no [[pair]] tables")
    pairs, names = [], set()
    for index, entry in enumerate(entries):
        missing = [key for key in REQUIRED if key not in entry]
        if missing:
            raise OptionError(f"{path}: pair {index} lacks {', '.join(missing)}")
        name = str(entry["name"])
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise OptionError(f"{path}: pair name {name!r} must be unique and use only letters, digits, _ . -")
        names.add(name)
        if ("subject_image" in entry) != ("style_image" in entry):
            raise OptionError(f"{path}: pair {name!r} gives one reference image; give both or neither")

        def resolve(key, entry=entry):
            return (path.parent / entry[key]).resolve() if key in entry else None

        pairs.append(Pair(name, resolve("subject"), resolve("style"), entry["prompt"], entry["subject_prompt"],
                          entry["style_prompt"], resolve("subject_image"), resolve("style_image")))
    return pairs

