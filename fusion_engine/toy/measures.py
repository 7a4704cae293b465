"""Two transparent measures of the toy world that need no learned model.

* Subject fidelity: IoU between the image's foreground mask and the subject's silhouette (best over the
  renderer's jitter: +-1 px shifts and a few radii). The foreground is every pixel farther than
  ``threshold`` (RGB distance, images in [0, 1]) from the background colour, the median of the border pixels.
* Style fidelity: the mean of a palette score (intersection of 4x4x4-bin colour histograms, in [0, 1]) and a
  texture score (exp(-L1 distance) between the mean absolute colour differences of neighbouring foreground
  pixels along x, y and both diagonals, and along 2-pixel offsets), each against reference renders of the
  held-out style on every shape.

Both take PIL images, (B, 3, H, W) tensors or (H, W, 3) arrays in [0, 1], and return one score per image.
"""
from __future__ import annotations

import numpy as np

from .data import HELD_STYLE, SHAPES, SIZE, SUBJECT_SHAPE, render, silhouette

OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 2), (2, 0), (2, 2), (2, -2))


def as_arrays(images) -> list[np.ndarray]:
    """-> list of (H, W, 3) float arrays in [0, 1]."""
    import torch

    if isinstance(images, torch.Tensor):
        images = images.unsqueeze(0) if images.ndim == 3 else images
        return [a for a in images.detach().float().permute(0, 2, 3, 1).cpu().numpy()]
    if isinstance(images, np.ndarray) and images.ndim == 3:
        return [images.astype(np.float64)]
    if not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for image in images:
        if isinstance(image, np.ndarray):
            out.append(image.astype(np.float64))
        else:
            out.append(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0)
    return out


def background(image: np.ndarray) -> np.ndarray:
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
    return np.median(border, axis=0)


def foreground_mask(image: np.ndarray, threshold: float = 0.25) -> np.ndarray:
    return np.linalg.norm(image - background(image), axis=-1) > threshold


def _silhouettes(shape: str) -> list[np.ndarray]:
    centre = SIZE / 2
    return [silhouette(shape, centre + dx, centre + dy, r)
            for dx in (-1, 0, 1) for dy in (-1, 0, 1) for r in (5.3, 6.0, 6.7)]


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def subject_fidelity(images, shape: str = SUBJECT_SHAPE) -> np.ndarray:
    """Best mask IoU with ``shape``'s silhouette, per image, in [0, 1]."""
    references = _silhouettes(shape)
    return np.array([max(iou(foreground_mask(image), ref) for ref in references) for image in as_arrays(images)])


def palette_histogram(image: np.ndarray, bins: int = 4) -> np.ndarray:
    index = np.clip((image * bins).astype(int), 0, bins - 1)
    flat = (index[..., 0] * bins + index[..., 1]) * bins + index[..., 2]
    histogram = np.bincount(flat.ravel(), minlength=bins**3).astype(np.float64)
    return histogram / histogram.sum()


def texture_statistics(image: np.ndarray) -> np.ndarray:
    """Mean absolute colour difference between foreground pixels and their neighbours at ``OFFSETS``."""
    mask = foreground_mask(image)
    stats = []
    for dy, dx in OFFSETS:
        h, w = mask.shape
        ys, xs = slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), w - max(0, dx))
        ys2 = slice(max(0, dy), h - max(0, -dy) if dy < 0 else h)
        xs2 = slice(max(0, dx), w + min(0, dx) if dx < 0 else w)
        a, b = image[ys, xs], image[ys2, xs2]
        both = mask[ys, xs] & mask[ys2, xs2]
        diff = np.abs(a - b).sum(-1)
        stats.append(float(diff[both].mean()) if both.any() else 0.0)
    return np.array(stats)


class StyleReference:
    """Palette histogram and texture statistics of a style, from its renders on every shape."""

    def __init__(self, style: str = HELD_STYLE, renders: int = 4, seed: int = 0):
        rng = np.random.default_rng(seed)
        images = [render(shape, style, rng) for shape in SHAPES for _ in range(renders)]
        self.histogram = np.mean([palette_histogram(i) for i in images], axis=0)
        self.texture = np.mean([texture_statistics(i) for i in images], axis=0)

    def score(self, image: np.ndarray) -> float:
        palette = float(np.minimum(palette_histogram(image), self.histogram).sum())
        texture = float(np.exp(-np.abs(texture_statistics(image) - self.texture).mean() / 0.3))
        return 0.5 * palette + 0.5 * texture


_REFERENCES: dict[str, StyleReference] = {}


def style_fidelity(images, style: str = HELD_STYLE) -> np.ndarray:
    """Palette + texture agreement with ``style``, per image, in [0, 1]."""
    if style not in _REFERENCES:
        _REFERENCES[style] = StyleReference(style)
    reference = _REFERENCES[style]
    return np.array([reference.score(image) for image in as_arrays(images)])


TRANSPARENT_METRICS = ("subject_iou", "style_fid")


def transparent_scores(images, shape: str = SUBJECT_SHAPE, style: str = HELD_STYLE) -> dict:
    return {"subject_iou": subject_fidelity(images, shape), "style_fid": style_fidelity(images, style)}
