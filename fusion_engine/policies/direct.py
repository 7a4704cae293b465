"""Direct merge: both deltas added with fixed weights (diffusers' set_adapters)."""
from __future__ import annotations

import math

import torch

from ..errors import OptionError
from .base import Policy


class DirectPolicy(Policy):
    name = "direct"

    def __init__(self, weights: tuple[float, float] = (1.0, 1.0)):
        try:
            subject_weight, style_weight = (float(w) for w in weights)
        except (TypeError, ValueError):
            raise OptionError(
                f"direct: weights must be two numbers (w_subject, w_style), got {weights!r:.80}") from None
        for role, weight in (("subject", subject_weight), ("style", style_weight)):
            if not math.isfinite(weight) or abs(weight) > torch.finfo(torch.float32).max:  # coefficients are float32
                raise OptionError(f"direct: weights={tuple(weights)!r}: the {role} weight {weight} is not finite "
                                  "in float32")
        self.subject_weight, self.style_weight = subject_weight, style_weight

    def weights(self, layer, context):
        return self.subject_weight, self.style_weight

    def describe(self) -> str:
        return f"direct[{self.subject_weight:g},{self.style_weight:g}]"


class PositionDirect(Policy):
    """Direct merge for a pool: position ``l`` of an image's names weighted by ``weights[l]`` (default 1 for all)."""

    name = "direct"

    def __init__(self, weights=None):
        if weights is not None:
            try:
                weights = tuple(float(w) for w in weights)
            except (TypeError, ValueError):
                raise OptionError(f"direct: weights must be numbers, one per named LoRA, got {weights!r:.80}") from None
            bad = [w for w in weights if not math.isfinite(w) or abs(w) > torch.finfo(torch.float32).max]
            if bad or not weights:
                raise OptionError(f"direct: weights={weights!r}: each must be finite in float32, at least one")
        self.weights_by_position = weights

    def check_named(self, count: int) -> None:
        if self.weights_by_position is not None and count > len(self.weights_by_position):
            raise OptionError(f"direct: an image names {count} LoRAs but weights has {len(self.weights_by_position)}")

    def image_weights(self, count: int, context) -> list[float]:
        return [1.0] * count if self.weights_by_position is None else list(self.weights_by_position[:count])

    def describe(self) -> str:
        shown = "1" if self.weights_by_position is None else ",".join(f"{w:g}" for w in self.weights_by_position)
        return f"direct[{shown}]"
