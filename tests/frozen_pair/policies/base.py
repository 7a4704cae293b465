"""What every policy is: a rule that says, per layer and call, how much of each LoRA delta to add."""
from __future__ import annotations


class Policy:
    """Base class. A policy either selects by divergence (FLS, inside the fused op, per group)
    or returns static weights ``(w_subject, w_style)`` from host-side state only (no device sync).
    """

    name = "policy"
    uses_divergence = False  # True: the fused op measures both branches and picks per group
    needs_step = False  # True: weights depend on the sampler's step (set via Fusion.set_step)

    def setup(self, layers) -> None:
        """Called once at attach with the fused layers (precompute anything static here)."""

    def weights(self, layer, context) -> tuple[float, float]:
        raise NotImplementedError(f"{type(self).__name__} does not define static weights")

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
