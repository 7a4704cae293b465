"""The public front door: everything ``import fusion_engine as fe`` offers is defined or gathered here.

``attach`` is the one entry point that fuses LoRAs into a model or a diffusers pipeline object; the rest are the
classes and functions a user meets (``fusion_engine/__init__.py`` re-exports this module).
"""
from __future__ import annotations

from .integration.attach import PipelineAttachment, attach_target
from .integration.batching import BatchFusion, Request, Result
from .integration.pipeline import FusionPipeline, FusionPipelineOutput
from .lora import LoRA, LoRALayer, load_lora, save_lora
from .policies import POLICIES, make_policy
from .refine import Refiner
from .runtime.fusion import Fusion, detach_all
from .runtime.pool import LoRAPool
from .runtime.trace import Trace


def attach(target, subject=None, style=None, *, pool=None, **options):
    """``fe.attach``: to a diffusers pipeline object (a ``PipelineAttachment``) or to a model (a ``Fusion``).

    See ``fusion_engine.runtime.fusion.attach_model`` for the options. With ``pool=`` (a ``fe.LoRAPool``, no subject
    or style) each image fuses the LoRAs it names (``set_loras``, or ``loras=`` per pipeline call).
    """
    return attach_target(target, subject, style, pool=pool, **options)


__all__ = ["BatchFusion", "Fusion", "FusionPipeline", "FusionPipelineOutput", "LoRA", "LoRALayer", "LoRAPool",
           "POLICIES", "PipelineAttachment", "Refiner", "Request", "Result", "Trace", "attach", "detach_all",
           "load_lora", "make_policy", "save_lora"]
