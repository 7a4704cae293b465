"""K-LoRA (CVPR 2025): per layer, compare the top-k magnitudes of both deltas, scaled over the run.

Scores never change during a run, so they are computed once at attach; the step comes from the
sampler (``Fusion.set_step``), not from counting layer calls.
"""
from __future__ import annotations

import torch

from ..errors import OptionError
from .base import Policy

PATTERNS = ("s*", "s")


def topk_abs_sum(delta: torch.Tensor, k: int) -> float:
    flat = delta.abs().flatten()
    return float(flat.topk(min(k, flat.numel())).values.sum())


def delta_abs_sum(delta: torch.Tensor) -> float:
    return float(delta.abs().sum())


def robust_gamma(ratios: list[float]) -> float:
    """Mean of sum|dWc| / sum|dWs| over layers, ignoring ratios at or above 3x the mean."""
    if not ratios:
        return 1.0
    mean = sum(ratios) / len(ratios)
    kept = [r for r in ratios if r < 3.0 * mean] or ratios
    return sum(kept) / len(kept)


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
            with torch.no_grad():
                subject_delta = layer.subject_scale * layer.delta_weight("subject")
                style_delta = layer.style_scale * layer.delta_weight("style")
            k = layer.subject_rank * layer.style_rank
            self.scores[layer.name] = (topk_abs_sum(subject_delta, k), topk_abs_sum(style_delta, k))
            ratios.append(delta_abs_sum(subject_delta) / max(delta_abs_sum(style_delta), 1e-30))
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
        subject = subject_score / self.gamma > style_score * self.time_scale(context.progress())
        return (1.0, 0.0) if subject else (0.0, 1.0)

    def describe(self) -> str:
        return f"klora[{self.pattern}]"
