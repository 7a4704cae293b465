"""Feature-Level Selection: per layer and group, keep the branch that perturbs the base features most."""
from __future__ import annotations

from ..reference import check_divergence
from .base import Policy


class FLSPolicy(Policy):
    name = "fls"
    uses_divergence = True

    def __init__(self, divergence: str = "kl"):
        self.divergence = check_divergence(divergence)

    def describe(self) -> str:
        return f"fls[{self.divergence}]"
