"""Errors raised by fusion_engine. Each message names the file, key, layer or shape at fault."""
from __future__ import annotations


class FusionEngineError(Exception):
    """Base class of every error this library raises on purpose."""


class LoRAFormatError(FusionEngineError, ValueError):
    """A LoRA file or state dict that cannot be read as a LoRA."""


class AttachError(FusionEngineError, ValueError):
    """A LoRA that does not fit the model, or a model that cannot take a fusion now."""


class StepContextError(FusionEngineError, RuntimeError):
    """A policy needs sampler state (the step, the batch layout) that nobody provided."""


def preview(names, limit: int = 5) -> str:
    """'a, b, c (+12 more)': enough names to find the problem without flooding the terminal."""
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")
