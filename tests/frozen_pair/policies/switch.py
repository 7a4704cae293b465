"""LoRA Switch: one LoRA active at a time, alternating every ``tau`` denoising steps (subject first)."""
from __future__ import annotations

from numbers import Integral

from fusion_engine.errors import OptionError

from .base import Policy


class SwitchPolicy(Policy):
    name = "switch"
    needs_step = True

    def __init__(self, tau: int = 5):
        whole = isinstance(tau, Integral) or (isinstance(tau, float) and tau.is_integer())
        if isinstance(tau, bool) or not whole or tau < 1:
            raise OptionError(f"switch: tau must be a whole number of steps >= 1, got {tau!r}")
        self.tau = int(tau)

    def weights(self, layer, context):
        subject_turn = (context.current_step() // self.tau) % 2 == 0
        return (1.0, 0.0) if subject_turn else (0.0, 1.0)

    def describe(self) -> str:
        return f"switch[tau={self.tau}]"
