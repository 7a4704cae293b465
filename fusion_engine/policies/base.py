"""What every policy is: a rule that says, per layer and call, how much of each LoRA delta to add.

A pair's layers ask ``weights(layer, context)`` (subject, style). A pool's images ask by position over the LoRAs
each names, in its order (position 0 is a pair's subject, 1 its style): ``image_weights(count, context)``, or for a
policy whose weights depend on the layer (``per_layer``) ``layer_weights(layer_name, names, context)``.
"""
from __future__ import annotations


class Policy:
    """Base class. A policy either selects by divergence (FLS, inside the fused op, per group)
    or returns static weights ``(w_subject, w_style)`` from host-side state only (no device sync).
    """

    name = "policy"
    uses_divergence = False  # True: the fused op measures both branches and picks per group
    needs_step = False  # True: weights depend on the sampler's step (set via Fusion.set_step)
    per_layer = False  # True (a pool): static weights per layer, ``layer_weights``; else per image, ``image_weights``

    def check_named(self, count: int) -> None:
        """A pool image names ``count`` LoRAs: an ``OptionError`` when this policy cannot fuse that many."""

    def image_weights(self, count: int, context) -> list[float]:
        """A pool image's static weight per position (the image names ``count`` LoRAs)."""
        raise NotImplementedError(f"{type(self).__name__} does not define static weights")

    def setup(self, layers) -> None:
        """Called once at attach with the fused layers (precompute anything static here)."""

    def prepare(self, assignment, pool) -> None:
        """A pool: called before each forward with the images' LoRA names, outside any compiled graph (compute and
        cache here what ``layer_weights`` / ``image_weights`` read, so the forward only looks it up)."""

    def weights(self, layer, context) -> tuple[float, float]:
        raise NotImplementedError(f"{type(self).__name__} does not define static weights")

    def describe(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
