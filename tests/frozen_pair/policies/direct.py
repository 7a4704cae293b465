"""Direct merge: both deltas added with fixed weights (diffusers' set_adapters)."""
from __future__ import annotations

import math

import torch

from fusion_engine.errors import OptionError

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
