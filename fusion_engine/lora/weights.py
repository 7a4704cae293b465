"""In-memory LoRA: per target layer the factors A (``lora_a``, kohya's "down") and B (``lora_b``, "up") and alpha."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer: delta W = (alpha / rank) * B @ A (times the LoRA's user scale).

    ``lora_a`` is (r, in) for a Linear or (r, in, kh, kw) for a Conv2d; ``lora_b`` is (out, r) or (out, r, 1, 1).
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    @property
    def is_conv(self) -> bool:
        return self.lora_a.ndim == 4

    def delta_weight(self) -> torch.Tensor:
        """B @ A reshaped like the base weight, without any scale."""
        lora_a = self.lora_a.flatten(1).float()
        lora_b = self.lora_b.flatten(1).float()
        return (lora_b @ lora_a).reshape(self.lora_b.shape[0], *self.lora_a.shape[1:])


@dataclass
class LoRA:
    """A loaded LoRA file, reduced to the denoiser layers it adapts.

    ``layers`` maps a module path inside the UNet (``down_blocks.0...attn1.to_q``) to its factors.
    ``scale`` is the user's strength; the effective per-layer scale is ``alpha / rank * scale``.
    """

    layers: dict[str, LoRALayer]
    source: str = "<state_dict>"
    layout: str = "unknown"
    scale: float = 1.0
    ignored: list[str] = field(default_factory=list)

    def layer_scale(self, name: str) -> float:
        layer = self.layers[name]
        return layer.alpha / layer.rank * self.scale

    @property
    def name(self) -> str:
        return Path(self.source).stem if self.source != "<state_dict>" else self.source

    def ranks(self) -> list[int]:
        return sorted({layer.rank for layer in self.layers.values()})

    def alphas(self) -> list[float]:
        return sorted({layer.alpha for layer in self.layers.values()})

    def with_scale(self, scale: float) -> "LoRA":
        return LoRA(dict(self.layers), self.source, self.layout, scale, list(self.ignored))

    def __repr__(self) -> str:
        return (
            f"LoRA({self.name!r}, layout={self.layout}, layers={len(self.layers)}, "
            f"ranks={self.ranks()}, alphas={self.alphas()}, scale={self.scale})"
        )
