"""Policies of a pool fusion, per image over the LoRAs it names (N >= 1), in the order it names them.

* ``fls``: N-way Feature-Level Selection inside the pooled op: per layer and decision group, the LoRA whose
  branch diverges most from the base features wins; ties go to the LoRA named earlier.
* ``direct``: every named LoRA added, position ``l`` weighted by ``weights[l]`` (default 1 for all).
* ``switch``: one named LoRA at a time, turns of ``tau`` steps in the order named (``(step // tau) % N``;
  with a pair this is LoRA Switch, subject first).

Static weights are computed on the host per image and position, once per forward, from the step only.
"""
from __future__ import annotations

import math

import torch

from .errors import OptionError, OptionTypeError
from .policies import FLSPolicy, SwitchPolicy

POOL_POLICIES = ("fls", "direct", "switch")


class PoolFLS(FLSPolicy):
    """N-way FLS (see the module docstring)."""

    def check_named(self, count: int) -> None:
        return None


class PoolDirect:
    name = "direct"
    uses_divergence = False
    needs_step = False

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


class PoolSwitch(SwitchPolicy):
    def check_named(self, count: int) -> None:
        return None

    def image_weights(self, count: int, context) -> list[float]:
        turn = (context.current_step() // self.tau) % count
        return [float(position == turn) for position in range(count)]


def make_pool_policy(policy, **options):
    """A pool policy from its name and options; ``OptionError`` for a policy the pool does not run."""
    classes = {"fls": PoolFLS, "direct": PoolDirect, "switch": PoolSwitch}
    if policy is None:
        policy = "fls"
    if policy not in classes:
        raise OptionError(f"policy {policy!r} is not available with a LoRA pool; expected one of {POOL_POLICIES} "
                          "(the others run on a single pair: fe.attach(model, subject, style, policy=...))")
    try:
        return classes[policy](**options)
    except TypeError as error:
        raise OptionTypeError(f"policy {policy!r} does not take options {sorted(options)}: {error}") from None


__all__ = ["POOL_POLICIES", "PoolDirect", "PoolFLS", "PoolSwitch", "make_pool_policy"]
