"""Generated images on disk: unique names per run, the generation parameters inside each PNG and beside it.

Each PNG carries two text chunks: ``parameters`` in the AUTOMATIC1111 web UI's layout (prompt, then
``Negative prompt: ...``, then ``Key: value, ...``; image viewers and civitai read it) and ``fusion_engine``
with the same facts as JSON, which ``read_parameters`` returns. A JSON sidecar ``NAME.json`` holds the JSON too.

Example:
    >>> from fusion_engine.cli.image_files import read_parameters
    >>> read_parameters("out/00001_0_0.png")["prompt"]
    'a sbu dog in szn style'
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

from ..errors import OptionError
from ..utils.io import atomic_write, write_text

JSON_KEY = "fusion_engine"
A1111_KEY = "parameters"
_RUN = re.compile(r"^(\d{5,})_")


def a1111_parameters(info: dict) -> str:
    """The A1111 ``parameters`` text of one image's ``info`` (the JSON record)."""
    fields = {
        "Steps": info["steps"], "Sampler": info["scheduler"], "CFG scale": info["guidance"], "Seed": info["seed"],
        "Batch index": info["index"], "Size": f"{info['width']}x{info['height']}", "Model": info["model"],
    }
    if info.get("true_cfg"):
        fields["True CFG scale"] = info["true_cfg"]
    loras = [f"{role}: {Path(lora['file']).name} ({lora['scale']:g})" for role in ("subject", "style")
             if (lora := info.get(role)) is not None]
    fields["LoRAs"] = ", ".join(loras)
    fields["Fusion"] = info["policy"]
    fields["Fusion options"] = json.dumps(info["options"], sort_keys=True)
    if info.get("llr"):
        fields["LLR"] = json.dumps(info["llr"], sort_keys=True)
    fields["Version"] = f"fusion-engine {info['version']}"

    def quoted(value) -> str:  # A1111 quotes values holding its separators
        text = str(value)
        return json.dumps(text) if any(c in text for c in ',:"\n') else text

    lines = [info["prompt"]]
    if info.get("negative_prompt"):
        lines.append(f"Negative prompt: {info['negative_prompt']}")
    lines.append(", ".join(f"{key}: {quoted(value)}" for key, value in fields.items()))
    return "\n".join(lines)


def next_run(out: Path) -> int:
    """1 + the highest run number of the files in ``out`` (``NNNNN_...``, and runs still writing), 1 for an empty
    folder."""
    names = [p.name.removeprefix(".") for p in Path(out).iterdir()] if Path(out).is_dir() else []
    return max((int(m.group(1)) for name in names if (m := _RUN.match(name))), default=0) + 1


def _claim_path(out: Path, run: int) -> Path:
    return Path(out) / f".{run:05d}_claim"


@contextmanager
def claim_run(out: Path):
    """A fresh run number in ``out``, held until the block ends: a hidden ``.NNNNN_claim`` marker made with an
    exclusive create, so two processes writing into one folder never share a number (the marker goes when the
    run's files are written; a crashed run's marker only retires its number)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    run = next_run(out)
    while True:
        try:
            with _claim_path(out, run).open("x"):
                pass
        except FileExistsError:  # another run holds this number
            run += 1
            continue
        if any(p.name.startswith(f"{run:05d}_") for p in out.iterdir()):  # a finished run's files: not free
            _claim_path(out, run).unlink()
            run += 1
            continue
        break
    try:
        yield run
    finally:
        _claim_path(out, run).unlink(missing_ok=True)


def save_png(image, path: Path, info: dict) -> Path:
    """Save ``image`` at ``path`` with ``info`` as PNG text chunks and a ``.json`` sidecar; crash-safe, and never
    over an existing file (``FileExistsError``, with nothing written)."""
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    chunks.add_text(A1111_KEY, a1111_parameters(info))
    chunks.add_text(JSON_KEY, json.dumps(info, sort_keys=True))
    with atomic_write(path, overwrite=False) as scratch:
        image.save(scratch, format="PNG", pnginfo=chunks)
    write_text(path.with_suffix(".json"), json.dumps(info, indent=1, sort_keys=True) + "\n")
    return path


def save_run(images, out: Path, info: dict, run: int | None = None) -> list[Path]:
    """Save a run's images as ``out/RUN_SEED_INDEX.png``: under ``run`` (held with ``claim_run``), or under a
    fresh run number claimed for the writing."""
    if run is None:
        with claim_run(out) as run:
            return save_run(images, out, info, run)
    return [save_png(image, Path(out) / f"{run:05d}_{info['seed']}_{i}.png", {**info, "run": run, "index": i})
            for i, image in enumerate(images)]


def read_parameters(path) -> dict:
    """The JSON record a PNG written by ``save_png`` carries."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get(JSON_KEY)
    if text is None:
        raise OptionError(f"{path}: no {JSON_KEY!r} text chunk (not written by fusion-engine generate)")
    return json.loads(text)
