"""In-memory LoRA: per target layer the factors A (``lora_a``, kohya's "down") and B (``lora_b``, "up") and alpha."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .checks import check_scale

DENOISER = "unet"
TRANSFORMER = "transformer"  # the denoiser of diffusion transformers (FLUX.1, SD3): pipe.transformer
DENOISERS = (DENOISER, TRANSFORMER)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = (*DENOISERS, *TEXT_ENCODERS)


def delta_weight(lora_a: torch.Tensor, lora_b: torch.Tensor) -> torch.Tensor:
    """Unscaled B @ A in float32, shaped like the base weight: (out, in) or (out, in, kh, kw).

    Args:
        lora_a: (r, in) or (r, in, kh, kw).
        lora_b: (out, r) or (out, r, 1, 1).
    """
    return (lora_b.flatten(1).float() @ lora_a.flatten(1).float()).reshape(lora_b.shape[0], *lora_a.shape[1:])


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: delta W = (alpha / rank) * B @ A (times the LoRA's user scale).

    ``lora_a`` is (r, in) for a Linear or (r, in, kh, kw) for a Conv2d; ``lora_b`` is (out, r) or (out, r, 1, 1).
    ``magnitude`` (out,) makes it a DoRA layer (PEFT's ``lora_magnitude_vector``, kohya's ``dora_scale``):
    the adapted weight is ``magnitude * (W + s B A) / ||W + s B A||`` with the norm taken per output row.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float
    magnitude: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.lora_a.ndim == 4

    @property
    def is_dora(self) -> bool:
        return self.magnitude is not None

    def delta_weight(self) -> torch.Tensor:
        """B @ A reshaped like the base weight, without any scale."""
        return delta_weight(self.lora_a, self.lora_b)


@dataclass
class LoRA:
    """A loaded LoRA file: the denoiser layers it adapts, and the text-encoder layers if it has any.

    ``layers`` maps a module path inside ``component`` (the UNet unless said otherwise:
    ``down_blocks.0...attn1.to_q``) to its factors. ``other_components`` holds the rest of the file by
    component (``"text_encoder"``, ``"text_encoder_2"``); ``components`` shows all of them and
    ``for_component(name)`` gives one as a LoRA of its own, ready for ``fe.attach``.
    ``scale`` is the user's strength; the effective per-layer scale is ``alpha / rank * scale``.
    ``family`` is the base model the file is for (``lora.families.FAMILIES``: ``"sd-unet"``, ``"flux"``,
    ``"sd3"``, ``"dit"``), ``None`` for a LoRA built in memory; the denoiser part of a FLUX/SD3 file is the
    ``"transformer"`` component.

    Example:
        >>> lora = fe.load_lora("dreambooth_dog.safetensors")
        >>> sorted(lora.components)
        ['text_encoder', 'unet']
        >>> fe.attach(pipe.text_encoder, subject=lora.for_component("text_encoder"))
    """

    layers: dict[str, LoRALayer]
    source: str = "<state_dict>"
    layout: str = "unknown"
    scale: float = 1.0
    ignored: list[str] = field(default_factory=list)
    component: str = DENOISER
    other_components: dict[str, dict[str, LoRALayer]] = field(default_factory=dict)
    family: str | None = None

    def layer_scale(self, name: str) -> float:
        layer = self.layers[name]
        return layer.alpha / layer.rank * self.scale

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source != "<state_dict>" else self.source

    @property
    def components(self) -> dict[str, dict[str, LoRALayer]]:
        """Component name -> {module path inside that component: layer}, for every non-empty part."""
        parts = {self.component: self.layers, **self.other_components}
        return {name: layers for name, layers in parts.items() if layers}

    @property
    def is_dora(self) -> bool:
        return any(layer.is_dora for layers in self.components.values() for layer in layers.values())

    def for_component(self, name: str) -> LoRA | None:
        """The part of this LoRA that adapts component ``name`` (``None`` when the file has none)."""
        layers = self.components.get(name)
        if not layers:
            return None
        return LoRA(dict(layers), self.source, self.layout, self.scale, component=name, family=self.family)

    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers.values()})

    def alphas(self) -> list[float]:
        return sorted({layer.alpha for layer in self.layers.values()})

    def with_scale(self, scale: float) -> LoRA:
        scale = check_scale(scale, f"LoRA({self.name!r}).with_scale")
        return replace(self, layers=dict(self.layers), scale=scale, ignored=list(self.ignored),
                       other_components=dict(self.other_components))

    def __repr__(self) -> str:
        others = "".join(f", {name}={len(layers)}" for name, layers in self.other_components.items() if layers)
        return (
            f"LoRA({self.name!r}, layout={self.layout}, family={self.family}, layers={len(self.layers)}{others}, "
            f"ranks={self.ranks()}, alphas={self.alphas()}, scale={self.scale})"
        )
