"""What an attach does with the parts of a LoRA file: per-component defaults, the parts it leaves out,
and the layers a backend cannot run.

A LoRA file can adapt the UNet and the text encoders (``LoRA.components``). One attach fuses one
model, so it takes one component; the rest of the file must be attached elsewhere, never dropped
without a word.
"""
from __future__ import annotations

import warnings

from fusion_engine.errors import AttachError, OptionError, preview
from fusion_engine.lora import LoRA
from fusion_engine.lora.weights import TEXT_ENCODERS

# Text encoders run once per prompt, before the first denoising step: no step-dependent policy.
TEXT_ENCODER_POLICIES = ("direct", "fls")
TEXT_ENCODER_DEFAULTS = ("direct", "sample")
DENOISER_DEFAULTS = ("fls", "image")


def _component(subject: LoRA | None, style: LoRA | None) -> str:
    components = {lora.component for lora in (subject, style) if lora is not None}
    if len(components) > 1:
        raise AttachError(
            f"subject and style adapt different components ({subject.component} and {style.component}); pass "
            "the same part of both, e.g. subject.for_component('text_encoder') and style.for_component('text_encoder')"
        )
    return components.pop()


def component_defaults(subject: LoRA | None, style: LoRA | None, policy, granularity):
    """(policy, granularity) with the defaults of the component the LoRAs adapt; text encoders refuse step policies."""
    component = _component(subject, style)
    default_policy, default_granularity = TEXT_ENCODER_DEFAULTS if component in TEXT_ENCODERS else DENOISER_DEFAULTS
    policy = default_policy if policy is None else policy
    name = policy if isinstance(policy, str) else getattr(policy, "name", policy)
    if component in TEXT_ENCODERS and name not in TEXT_ENCODER_POLICIES:
        raise OptionError(
            f"policy {name!r} cannot run on a text encoder ({component}): it encodes each prompt once, before "
            f"any denoising step; use one of {TEXT_ENCODER_POLICIES} (default {default_policy!r})"
        )
    return policy, default_granularity if granularity is None else granularity


def warn_unapplied_components(subject: LoRA | None, style: LoRA | None) -> None:
    """Warn when a LoRA passed whole has parts for components other than the one being attached."""
    for role, lora in (("subject", subject), ("style", style)):
        others = {name: len(layers) for name, layers in lora.other_components.items() if layers} if lora else {}
        if others:
            parts = ", ".join(f"{name} ({count} layers)" for name, count in others.items())
            warnings.warn(
                f"{role} LoRA {lora.source}: this attach applies its {lora.component} part only; its {parts} "
                f"part{'s are' if len(others) > 1 else ' is'} not applied. Attach each part to its model "
                f"(fe.attach(pipe.text_encoder, lora.for_component('text_encoder'), ...)), pass "
                f"lora.for_component('{lora.component}') to say the rest is left out on purpose, or load "
                "with fe.load_lora(path, text_encoder=False)",
                UserWarning, stacklevel=3,
            )


def refuse_unsupported_backend(subject: LoRA | None, style: LoRA | None, backend: str) -> None:
    """The fused kernels take plain LoRA only: ``backend="triton"`` with a DoRA layer fails here, not mid-sampling.

    ``backend="auto"`` runs DoRA layers on the reference path and the rest on the kernels.
    """
    if backend != "triton":
        return
    dora = sorted({name for lora in (subject, style) if lora is not None
                   for name, layer in lora.layers.items() if layer.is_dora})
    if dora:
        raise OptionError(
            f"backend 'triton' does not run DoRA layers ({len(dora)} here, e.g. {preview(dora, 3)}); use "
            "backend='auto' (DoRA layers on the reference path, the rest on the kernels) or 'reference'"
        )


__all__ = ["component_defaults", "refuse_unsupported_backend", "warn_unapplied_components"]
