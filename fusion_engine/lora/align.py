"""Module paths of a LoRA -> the paths of the model it is attached to, where versions of a model differ.

transformers 5 flattened ``CLIPTextModel`` (no ``text_model.`` level) but not ``CLIPTextModelWithProjection``,
while kohya files and text encoders of older transformers have the level. diffusers resolves this
when it loads a text encoder's LoRA; this does the same at attach, in both directions.
"""
from __future__ import annotations

from dataclasses import replace

import torch.nn as nn

from .weights import LoRA

_OPTIONAL_LEVELS = ("text_model.",)


def _resolve(name: str, modules: set[str]) -> str:
    if name in modules:
        return name
    for level in _OPTIONAL_LEVELS:
        for candidate in (name.removeprefix(level), level + name):
            if candidate != name and candidate in modules:
                return candidate
    return name  # left for the fit check to report


def align_to_model(lora: LoRA | None, model: nn.Module) -> LoRA | None:
    """``lora`` with each layer renamed to the path it has in ``model`` (``lora`` itself if nothing changes)."""
    if lora is None:
        return None
    modules = {name for name, _ in model.named_modules()}
    renamed = {_resolve(name, modules): layer for name, layer in lora.layers.items()}
    if list(renamed) == list(lora.layers) or len(renamed) != len(lora.layers):
        return lora
    return replace(lora, layers=renamed, ignored=list(lora.ignored), other_components=dict(lora.other_components))
