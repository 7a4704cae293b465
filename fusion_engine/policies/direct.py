"""Direct merge: both deltas added with fixed weights (diffusers' set_adapters)."""
from __future__ import annotations

from ..errors import OptionError
from .base import Policy


class DirectPolicy(Policy):
    name = "direct"

    def __init__(self, weights: tuple[float, float] = (1.0, 1.0)):
        if len(weights) != 2:
            raise OptionError(f"direct: weights must be (w_subject, w_style), got {weights!r}")
        self.subject_weight, self.style_weight = float(weights[0]), float(weights[1])

    def weights(self, layer, context):
        return self.subject_weight, self.style_weight

    def describe(self) -> str:
        return f"direct[{self.subject_weight:g},{self.style_weight:g}]"
