"""Where a pipeline comes from: a local diffusers folder only. Nothing is ever downloaded."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import ModelPathError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # "owner/name", as on the Hugging Face Hub
_FOLDER_HINT = "a diffusers pipeline folder holds model_index.json"


def local_pipeline_folder(path) -> Path:
    """``path`` as a folder holding ``model_index.json``, or a ``ModelPathError`` that says what it is instead."""
    text = str(path)
    folder = Path(path).expanduser()
    if (folder / "model_index.json").is_file():
        return folder
    if folder.is_file():
        raise ModelPathError(
            f"{text}: is a file, not a pipeline folder ({_FOLDER_HINT}); for a single-file checkpoint load it with "
            "diffusers' from_single_file and pass the pipeline to FusionPipeline.from_pipe"
        )
    if folder.is_dir():
        raise ModelPathError(f"{text}: not a local diffusers pipeline folder (no model_index.json in it)")
    if _HUB_ID.match(text) and not _looks_local(text):
        raise ModelPathError(
            f"{text!r}: no such local folder, and it looks like a Hugging Face Hub id; only local folders are accepted "
            f"(nothing is downloaded at run time): download it first, e.g. `huggingface-cli download {text} "
            f"--local-dir ./{text.split('/')[-1]}`, then pass that folder ({_FOLDER_HINT})"
        )
    existing = _deepest_existing(folder)
    where = f" ({existing} exists, but not {folder.relative_to(existing)} in it)" if existing is not None else ""
    raise ModelPathError(f"{text}: no such folder{where} ({_FOLDER_HINT})")


def _looks_local(text: str) -> bool:
    """A path the user meant as local: ./x, ../x, ~/x, absolute, or one whose first part exists here."""
    if text.startswith(("./", "../", "~", "/", ".\\", "..\\")):
        return True
    return Path(text.split("/")[0]).exists()


def _deepest_existing(folder: Path) -> Path | None:
    """The longest leading part of ``folder`` that exists (not the bare current folder or root), if any."""
    for parent in folder.parents:
        if parent != Path(".") and parent != Path(parent.anchor) and parent.is_dir():
            return parent
    return None


# transformer (DiT) pipeline families this library drives, by diffusers class-name prefix
DIT_FAMILIES = ("Flux", "StableDiffusion3")


def _model_index(folder: Path) -> dict:
    import json

    index_path = folder / "model_index.json"
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ModelPathError(f"{index_path}: not valid JSON ({error})") from None
    if not isinstance(index, dict):
        raise ModelPathError(f"{index_path}: expected a JSON object (a diffusers model_index.json)")
    return index


def pipeline_class_name(folder) -> str:
    """The pipeline class a local folder's ``model_index.json`` names (``"FluxPipeline"``, ...), read without loading
    anything; a ``ModelPathError`` for a folder that is not a pipeline folder.

    Example:
        >>> pipeline_class_name("./flux-dev")
        'FluxPipeline'
    """
    return str(_model_index(local_pipeline_folder(folder)).get("_class_name", "an unnamed pipeline"))


def check_supported(folder) -> Path:
    """``folder`` (a local pipeline folder) if its denoiser is one this library can fuse (a UNet, or the
    transformer of a FLUX or SD3 pipeline), else a ``ModelPathError`` that names the pipeline class and says
    what is supported."""
    folder = local_pipeline_folder(folder)
    index = _model_index(folder)
    name = str(index.get("_class_name", "an unnamed pipeline"))
    if "unet" in index or ("transformer" in index and name.startswith(DIT_FAMILIES)):
        return folder
    kind = "its denoiser is a transformer" if "transformer" in index else "it has no UNet and no transformer"
    raise ModelPathError(
        f"{folder}: a {name} folder, and {kind}; fusion-engine fuses the UNet of SD 1.x/2.x and SDXL pipelines and "
        "the transformer of FLUX and SD3 pipelines, not this one")


def load_local_pipeline(path, torch_dtype=None, device=None):
    """A diffusers pipeline from the local folder ``path`` (never the network), moved to ``device`` if given.

    Args:
        path: a folder holding ``model_index.json``; anything else raises a ``ModelPathError`` that says what it is.
        torch_dtype: the models' dtype (default: as saved).
        device: where to move the pipeline (default: left on the CPU).

    Example:
        ```py
        >>> pipe = load_local_pipeline("./sdxl-base", torch_dtype=torch.float16, device="cuda")
        ```
    """
    from diffusers import DiffusionPipeline

    folder = local_pipeline_folder(path)
    pipe = DiffusionPipeline.from_pretrained(str(folder), torch_dtype=torch_dtype, local_files_only=True)
    return pipe.to(device) if device is not None else pipe
