"""K-LoRA (CVPR 2025): per layer, compare the top-k magnitudes of both deltas, scaled over the run.

Scores never change during a run, so they are computed once at attach, and kept in a bounded cache keyed
by the factors' content, the scale and k: a second attach of the same LoRAs (every ``FusionPipeline``
call attaches anew) only hashes the factors instead of forming every B @ A and its top-k again. The step
comes from the sampler (``Fusion.set_step``), not from counting layer calls.

A delta that is exactly zero at a layer (an all-zero factor, or a LoRA loaded with ``scale=0``) counts
as absent there, as in FLS: the other LoRA is chosen, and the layer is left out of gamma (the
subject/style magnitude ratio); with no layer where both deltas are non-zero, gamma is 1.
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict

import torch

from ..errors import OptionError
from ..lora.weights import delta_weight
from .base import Policy

PATTERNS = ("s*", "s")
SCORE_CACHE_SIZE = 16_384  # (branch, layer) entries of two floats each: a few MB at most
_score_cache: OrderedDict[tuple, tuple[float, float]] = OrderedDict()
_score_lock = threading.Lock()


def topk_abs_sum(delta: torch.Tensor, k: int) -> float:
    flat = delta.abs().flatten()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def delta_abs_sum(delta: torch.Tensor) -> float:
    return float(delta.abs().sum())


def robust_gamma(ratios: list[float]) -> float:
    """Mean of sum|dWc| / sum|dWs| over layers, ignoring ratios at or above 3x the mean."""
    if not ratios:
        return 1.0
    mean = math.fsum(ratios) / len(ratios)  # fsum: the same gamma whatever order the layers come in
    kept = [r for r in ratios if r < 3.0 * mean] or ratios
    return math.fsum(kept) / len(kept)


def _fingerprint(*tensors: torch.Tensor) -> bytes:
    """Content hash of tensors (dtype, shape and bytes): equal for equal factors whatever object holds them."""
    digest = hashlib.blake2b(digest_size=20)
    for tensor in tensors:
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().contiguous().flatten().view(torch.uint8).cpu().numpy())
    return digest.digest()


def clear_score_cache() -> None:
    with _score_lock:
        _score_cache.clear()


def branch_scores(layer, branch: str, k: int) -> tuple[float, float]:
    """(top-k sum, total sum) of |scale * B @ A| for one branch of a fused layer, cached by content."""
    lora_a, lora_b = (layer.subject_a, layer.subject_b) if branch == "subject" else (layer.style_a, layer.style_b)
    scale = layer.subject_scale if branch == "subject" else layer.style_scale
    return factor_scores(lora_a, lora_b, scale, k)


def factor_scores(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, k: int) -> tuple[float, float]:
    """(top-k sum, total sum) of |scale * B @ A| (``B @ A`` in float32), cached by the factors' content.

    Args:
        lora_a, lora_b: one LoRA's factors at a layer, (r, K) and (N, r) (or their conv shapes).
        scale: the layer's scale (alpha / rank times the LoRA's scale).
        k: how many of the largest magnitudes to sum (K-LoRA: the product of both LoRAs' ranks).
    """
    key = (_fingerprint(lora_a, lora_b), float(scale), k)
    with _score_lock:
        if key in _score_cache:
            _score_cache.move_to_end(key)
            return _score_cache[key]
    with torch.no_grad():
        delta = scale * delta_weight(lora_a, lora_b)
        scores = (topk_abs_sum(delta, k), delta_abs_sum(delta))
    with _score_lock:
        _score_cache[key] = scores
        while len(_score_cache) > SCORE_CACHE_SIZE:
            _score_cache.popitem(last=False)
    return scores


class KLoRAPolicy(Policy):
    name = "klora"
    needs_step = True

    def __init__(self, pattern: str = "s*"):
        if pattern not in PATTERNS:
            raise OptionError(f"klora: unknown pattern {pattern!r}; expected one of {PATTERNS}")
        self.pattern = pattern
        self.scores: dict[str, tuple[float, float]] = {}
        self.gamma = 1.0

    def setup(self, layers) -> None:
        ratios = []
        self.scores = {}
        for layer in layers:
            if not (layer.has_subject and layer.has_style):
                continue
            k = layer.subject_rank * layer.style_rank
            subject_topk, subject_sum = branch_scores(layer, "subject", k)
            style_topk, style_sum = branch_scores(layer, "style", k)
            self.scores[layer.name] = (subject_topk, style_topk)
            if subject_sum > 0 and style_sum > 0:
                ratios.append(subject_sum / style_sum)
        self.gamma = robust_gamma(ratios)

    def time_scale(self, progress: float) -> float:
        if self.pattern == "s":
            return 1.5 * progress + 0.5
        return (1.5 * progress + 1.275) % 1.5

    def weights(self, layer, context):
        if not layer.has_style:
            return 1.0, 0.0
        if not layer.has_subject:
            return 0.0, 1.0
        subject_score, style_score = self.scores[layer.name]
        if subject_score == 0 or style_score == 0:  # a zero delta is absent here: the other LoRA (ties: subject)
            return (0.0, 1.0) if subject_score == 0 < style_score else (1.0, 0.0)
        subject = subject_score / self.gamma > style_score * self.time_scale(context.progress())
        return (1.0, 0.0) if subject else (0.0, 1.0)

    def describe(self) -> str:
        return f"klora[{self.pattern}]"


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

    def prepare(self, assignment, pool) -> None:
        for names in dict.fromkeys(assignment):  # each image's scores, hashed and computed here, not in a forward
            self.image_scores(names, pool)

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
