"""Policies of a pool fusion, per image over the LoRAs it names (N >= 1), in the order it names them.

* ``fls``: N-way Feature-Level Selection inside the pooled op: per layer and decision group, the LoRA whose
  branch diverges most from the base features wins; ties go to the LoRA named earlier.
* ``direct``: every named LoRA added, position ``l`` weighted by ``weights[l]`` (default 1 for all).
* ``switch``: one named LoRA at a time, turns of ``tau`` steps in the order named (``(step // tau) % N``;
  with a pair this is LoRA Switch, subject first).
* ``klora``: K-LoRA per image and layer (``PoolKLoRA``); with a pair exactly the single-pair ``klora``.

Static weights are computed on the host per image and position, once per forward, from the step only
(``klora``: per layer too, from scores computed once per image's names and pool version).
"""
from __future__ import annotations

import math

import torch

from ..errors import OptionError, OptionTypeError
from .fls import FLSPolicy
from .klora import KLoRAPolicy, factor_scores, robust_gamma
from .switch import SwitchPolicy

POOL_POLICIES = ("fls", "direct", "switch", "klora")


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


class PoolKLoRA(KLoRAPolicy):
    """K-LoRA per image over the LoRAs it names, ``names[0]`` the subject, the others styles.

    At a layer, the candidates are the image's LoRAs that adapt it: none -> the base layer; one -> that LoRA.
    Otherwise each candidate ``p`` scores ``S_p``, the sum of the ``k`` largest ``|scale_p * B_p A_p|`` with
    ``k`` the product of the two largest candidate ranks, and a LoRA whose ``S_p`` is 0 is absent (all absent:
    the first candidate). The subject's value is ``S_0 / gamma_0``, a style's ``S_p * time_scale(t) / gamma_p``,
    where ``gamma_p`` is K-LoRA's robust mean of ``sum|dW_p| / sum|dW_1|`` over the layers both adapt (so
    ``gamma_1 = 1``). The largest value wins; the subject only when strictly larger than every style (K-LoRA's
    strict comparison, so a pair is exactly the single-pair ``klora``), and ties among styles go to the LoRA
    named earlier.
    """

    per_layer = True

    def __init__(self, pattern: str = "s*"):
        super().__init__(pattern)
        self._images: dict[tuple, dict] = {}

    def setup(self, layers) -> None:
        """Scores come per image from the pool (``image_scores``), not from the fused layers."""

    def check_named(self, count: int) -> None:
        return None

    def image_scores(self, names: tuple[str, ...], pool) -> dict:
        """``{"layers": layer -> (candidate positions, S per candidate), "gamma": per position}``, cached per
        names and pool version."""
        key = (names, pool.version)
        if key not in self._images:
            if len(self._images) >= 256:
                self._images.clear()
            self._images[key] = self._scores(names, pool)
        return self._images[key]

    @staticmethod
    def _scores(names: tuple[str, ...], pool) -> dict:
        adapted = [pool.lora_layers(name) for name in names]
        layers, totals = {}, {}
        for layer in sorted(set().union(*adapted)):
            candidates = [p for p, ranks in enumerate(adapted) if layer in ranks]
            if len(candidates) < 2:
                layers[layer] = (candidates, None)
                continue
            top = sorted((adapted[p][layer][0] for p in candidates), reverse=True)
            k, scores = top[0] * top[1], []
            for p in candidates:
                topk, total = factor_scores(*pool.factors(names[p], layer), adapted[p][layer][1], k)
                scores.append(topk)
                totals[p, layer] = total
            layers[layer] = (candidates, scores)
        gamma = [1.0] * len(names)
        for p in range(len(names)):
            if p != 1 and len(names) > 1:
                gamma[p] = robust_gamma([totals[p, layer] / totals[1, layer] for layer in layers
                                         if totals.get((p, layer), 0) > 0 and totals.get((1, layer), 0) > 0])
        return {"layers": layers, "gamma": gamma}

    def layer_choice(self, layer: str, names: tuple[str, ...], context) -> int:
        """The position kept at ``layer`` for an image naming ``names`` (``-1``: the base layer)."""
        scores = self.image_scores(names, context.pool)
        candidates, values = scores["layers"].get(layer, ([], None))
        if values is None:
            return candidates[0] if candidates else -1
        live = [(p, v) for p, v in zip(candidates, values) if v > 0]
        if len(live) < 2:
            return live[0][0] if live else candidates[0]
        time_scale, gamma = self.time_scale(context.progress()), scores["gamma"]
        styles = [(v * time_scale / gamma[p], p) for p, v in live if p > 0]
        best, style = max(styles, key=lambda item: (item[0], -item[1]))  # ties among styles: the earlier name
        subject = [v / gamma[0] for p, v in live if p == 0]
        return 0 if subject and subject[0] > best else style

    def layer_weights(self, layer: str, names: tuple[str, ...], context) -> list[float]:
        choice = self.layer_choice(layer, names, context)
        return [float(position == choice) for position in range(len(names))]


def make_pool_policy(policy, **options):
    """A pool policy from its name and options; ``OptionError`` for a policy the pool does not run."""
    classes = {"fls": PoolFLS, "direct": PoolDirect, "switch": PoolSwitch, "klora": PoolKLoRA}
    if policy is None:
        policy = "fls"
    if policy not in classes:
        raise OptionError(f"policy {policy!r} is not available with a LoRA pool; expected one of {POOL_POLICIES} "
                          "(the others run on a single pair: fe.attach(model, subject, style, policy=...))")
    try:
        return classes[policy](**options)
    except TypeError as error:
        raise OptionTypeError(f"policy {policy!r} does not take options {sorted(options)}: {error}") from None


__all__ = ["POOL_POLICIES", "PoolDirect", "PoolFLS", "PoolKLoRA", "PoolSwitch", "make_pool_policy"]
