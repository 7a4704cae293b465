"""Feature-Level Selection: per layer and group, keep the branch that perturbs the base features most."""
from __future__ import annotations

from ..ops.reference import DIVERGENCES
from .base import Policy
from ..errors import OptionError


class FLSPolicy(Policy):
    name = "fls"
    uses_divergence = True

    def __init__(self, divergence: str = "kl"):
        if divergence not in DIVERGENCES:
            raise OptionError(f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}")
        self.divergence = divergence

    def describe(self) -> str:
        return f"fls[{self.divergence}]"
