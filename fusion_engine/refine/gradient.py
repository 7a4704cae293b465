"""Optional shaping of the LLR gradient (the paper uses neither: both off by default)."""
from __future__ import annotations

import torch


def per_image_norm(grad: torch.Tensor) -> torch.Tensor:
    return grad.flatten(1).float().norm(dim=1).view(-1, *([1] * (grad.ndim - 1))).to(grad.dtype)


def shape_gradient(grad: torch.Tensor, normalize: bool = False, clip_norm: float | None = None) -> torch.Tensor:
    """``normalize``: rescale each image's gradient to unit RMS, so ``m`` is a step in latent units.
    ``clip_norm``: then cap each image's L2 norm at ``clip_norm``."""
    if normalize:
        rms = per_image_norm(grad) / grad[0].numel() ** 0.5
        grad = grad / rms.clamp_min(torch.finfo(grad.dtype).tiny)
    if clip_norm is not None:
        grad = grad * (clip_norm / per_image_norm(grad).clamp_min(torch.finfo(grad.dtype).tiny)).clamp(max=1.0)
    return grad
