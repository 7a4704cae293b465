"""Where a pipeline comes from: a local diffusers folder only. Nothing is ever downloaded."""
from __future__ import annotations

import re
from pathlib import Path

from .errors import ModelPathError

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
    if _HUB_ID.match(text):
        raise ModelPathError(
            f"{text!r}: no such local folder, and it looks like a Hugging Face Hub id; only local folders are accepted "
            f"(nothing is downloaded at run time): download it first, e.g. `huggingface-cli download {text} "
            f"--local-dir ./{text.split('/')[-1]}`, then pass that folder ({_FOLDER_HINT})"
        )
    raise ModelPathError(f"{text}: no such folder ({_FOLDER_HINT})")


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
