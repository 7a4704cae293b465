"""The model and encoders of one run, from ``EvalSettings``: loaded objects as given, else loaded from local paths."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..errors import OptionError
from ..integration.model_path import load_local_pipeline
from ..utils.dtypes import default_dtype
from .settings import EvalSettings


def resolve_device(name=None) -> torch.device:
    """``name``, else ``cuda:LOCAL_RANK`` when CUDA is there (one GPU per shard), else cpu."""
    if name is not None:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise OptionError(f"device {name!r}: not a device name (cpu, cuda, cuda:1, mps)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise OptionError(f"device {name!r}: CUDA is not available here; use cpu")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def load_pipe(settings: EvalSettings, device: torch.device):
    """``settings.pipe`` moved to ``device``, or the local diffusers folder ``settings.model``."""
    if settings.pipe is not None:
        return settings.pipe.to(device)
    if settings.model is None:
        raise OptionError("EvalSettings needs a pipeline: give pipe= (a loaded one) or model= (a local folder)")
    # a ModelPathError names what the path is instead
    pipe = load_local_pipeline(settings.model, settings.dtype or default_dtype(device), device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _named_encoders(settings: EvalSettings) -> bool:
    return settings.clip_model is not None or settings.dino_model is not None


def load_encoders(settings: EvalSettings, device: torch.device):
    """(clip, dino): as given, loaded by name from local checkpoints, or tiny random ones."""
    from ..scoring.encoders import load_dino, load_openclip, tiny_dino, tiny_openclip

    if settings.clip is not None or settings.dino is not None:
        if settings.clip is None or settings.dino is None or _named_encoders(settings):
            raise OptionError("give both clip= and dino= as loaded encoders, without clip_model=/dino_model=")
        return settings.clip, settings.dino
    if not _named_encoders(settings):
        return tiny_openclip(0, device), tiny_dino(1, device)
    if settings.clip_model is None or settings.dino_model is None:
        raise OptionError("give both --clip and --dino (or neither, for the tiny random encoders)")
    clip_model = settings.clip_model
    if isinstance(clip_model, str) and clip_model.endswith(".json"):
        clip_model = json.loads(Path(clip_model).read_text())
    return load_openclip(clip_model, settings.clip_checkpoint, device=device), load_dino(
        settings.dino_model, settings.dino_checkpoint, device=device)


def describe_encoders(settings: EvalSettings) -> str:
    if settings.encoders_label is not None:
        return settings.encoders_label
    if settings.clip is not None:
        return "encoders given by the caller"
    if not _named_encoders(settings):
        return "tiny random encoders (scores are meaningless)"
    return (f"OpenCLIP {settings.clip_model} ({settings.clip_checkpoint}), "
            f"DINO {settings.dino_model} ({settings.dino_checkpoint})")
