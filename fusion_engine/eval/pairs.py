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

Every value is a string; a list ``prompt`` is refused (one pair, one prompt: write a [[pair]] per prompt).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputFileNotFoundError, OptionError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib


REQUIRED = ("name", "subject", "style", "prompt", "subject_prompt", "style_prompt")
OPTIONAL = ("subject_image", "style_image")


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
    subject_scale: float = 1.0  # the user's strength of each LoRA in the fused rows (``--scales``)
    style_scale: float = 1.0
    reference_name: str | None = None  # the unscaled pair whose references (each LoRA alone) a scaled pair shares

    @property
    def has_reference_images(self) -> bool:
        return self.subject_image is not None and self.style_image is not None


def scaled_pairs(pairs: list[Pair], scales) -> list[Pair]:
    """One pair per pair and (subject, style) scale pair, named ``NAME@1x0.7``; the fused rows use the LoRAs at
    those strengths, the subject-only / style-only references stay at full strength (shared by name)."""
    from dataclasses import replace

    return [replace(pair, name=f"{pair.name}@{a:g}x{b:g}", subject_scale=float(a), style_scale=float(b),
                    reference_name=pair.reference_name or pair.name)
            for pair in pairs for a, b in scales]


def _pair_error(path: Path, where: str, message: str) -> OptionError:
    return OptionError(f"{path}: {where}: {message}")


def _check_types(path: Path, where: str, entry: dict) -> None:
    """Every known key must be a string (a prompt, a name or a path relative to the file)."""
    for key in (*REQUIRED, *OPTIONAL):
        if key not in entry or isinstance(entry[key], str):
            continue
        value = entry[key]
        if key.endswith("prompt") and isinstance(value, list):
            raise _pair_error(path, where, f"{key} is a list; one pair has one prompt: write one [[pair]] per "
                                           "prompt (same LoRA files, distinct names)")
        raise _pair_error(path, where, f"{key} must be a string, got {type(value).__name__} {value!r}")


def load_pairs(path) -> list[Pair]:
    """The pairs of a pairs.toml; an ``OptionError`` naming the file, the pair and the key for anything amiss."""
    path = Path(path)
    if not path.is_file():
        raise InputFileNotFoundError(f"{path}: no such pairs file")
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise OptionError(f"{path}: not valid TOML ({error})") from None
    entries = data.get("pair")
    if not entries:
        raise OptionError(f"{path}: no [[pair]] tables")
    if not isinstance(entries, list) or not all(isinstance(entry, dict) for entry in entries):
        raise OptionError(f"{path}: 'pair' must be an array of tables ([[pair]] sections)")
    pairs, names = [], set()
    for index, entry in enumerate(entries):
        where = f"pair {index}" + (f" ({entry['name']!r})" if isinstance(entry.get("name"), str) else "")
        missing = [key for key in REQUIRED if key not in entry]
        if missing:
            raise _pair_error(path, where, f"lacks {', '.join(missing)}")
        _check_types(path, where, entry)
        name = entry["name"]
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name) or name in names:
            raise _pair_error(path, where, f"pair name {name!r} must be unique and use only letters, digits, _ . -")
        if not name.strip("."):  # '.' and '..' would name the output folder itself or its parent
            raise _pair_error(path, where, f"pair name {name!r} is all dots: it would write outside its own folder; "
                                           "use letters or digits")
        names.add(name)
        if ("subject_image" in entry) != ("style_image" in entry):
            raise _pair_error(path, where, "gives one reference image; give both subject_image and style_image "
                                           "or neither")

        def resolve(key, entry=entry):
            return (path.parent / entry[key]).resolve() if key in entry else None

        pairs.append(Pair(name, resolve("subject"), resolve("style"), entry["prompt"], entry["subject_prompt"],
                          entry["style_prompt"], resolve("subject_image"), resolve("style_image")))
    return pairs
