"""Transparent measures of the toy world: they need no learned model, only pixels and the renderer's geometry.

* **Subject IoU** (subject fidelity): the IoU between the image's foreground mask and the mushroom's
  silhouette, best over the renderer's jitter (centre +-2 px, size x0.9-1.1). The foreground is every pixel
  farther than ``FOREGROUND_DISTANCE`` (RGB distance, images in [0, 1]) from the background colour, the
  median of the border pixels. Colour plays no part: a mushroom in any style is still a mushroom.
* **Style Fid** (style fidelity): the mean of a palette score (intersection of 4x4x4-bin colour histograms,
  in [0, 1]) and a texture score (exp(-mean |difference| / 0.3) between the mean absolute colour differences
  of neighbouring foreground pixels at ``OFFSETS``, which see the stripes' width and direction), each against
  renders of the held-out style on every shape. Shape plays almost no part.

Decisions (the validity gates count them):

* **recognised as the subject**: Subject IoU >= ``SUBJECT_THRESHOLD`` and higher than the image's best IoU with
  every base shape (so a blob that fits a circle as well as a mushroom is not a mushroom);
* **carries the style**: Style Fid >= ``STYLE_THRESHOLD`` and higher than the image's Style Fid against every
  base style.

Both thresholds were fixed from renders before any model was trained (``tests/test_toy_world.py`` checks that
every jittered render of the subject / held-out style passes and every other shape / style fails).

Every function takes PIL images, (B, 3, H, W) tensors or (H, W, 3) arrays in [0, 1], and returns one value per
image.
"""
from __future__ import annotations

from functools import cache

import numpy as np

from .data import (
    BASE_SHAPES,
    BASE_STYLES,
    HELD_STYLE,
    RADIUS,
    SCALES,
    SHAPES,
    SHIFTS,
    SIZE,
    SUBJECT_SHAPE,
    render,
    silhouette,
)

FOREGROUND_DISTANCE = 0.25
SUBJECT_THRESHOLD = 0.6
STYLE_THRESHOLD = 0.6
OFFSETS = ((0, 1), (1, 0), (1, 1), (1, -1), (0, 3), (3, 0), (2, 2), (2, -2))  # (dy, dx)


def as_arrays(images) -> list[np.ndarray]:
    """-> list of (H, W, 3) float arrays in [0, 1]."""
    import torch

    if isinstance(images, torch.Tensor):
        images = images.unsqueeze(0) if images.ndim == 3 else images
        return [a for a in images.detach().float().permute(0, 2, 3, 1).cpu().numpy().astype(np.float64)]
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


def foreground_mask(image: np.ndarray) -> np.ndarray:
    return np.linalg.norm(image - background(image), axis=-1) > FOREGROUND_DISTANCE


@cache
def _silhouettes(shape: str) -> np.ndarray:
    """(n, 32*32) float: ``shape`` at every jitter the renderer uses."""
    centre = SIZE / 2
    masks = [silhouette(shape, centre + dx, centre + dy, RADIUS * s) for dx in SHIFTS for dy in SHIFTS for s in SCALES]
    return np.stack(masks).reshape(len(masks), -1).astype(np.float64)


def best_iou(mask: np.ndarray, shape: str) -> float:
    """The best IoU of ``mask`` with ``shape`` over the renderer's jitter."""
    references = _silhouettes(shape)
    flat = mask.reshape(-1).astype(np.float64)
    inter = references @ flat
    union = references.sum(1) + flat.sum() - inter
    return float(np.max(np.where(union > 0, inter / np.maximum(union, 1), 0.0)))


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def subject_fidelity(images, shape: str = SUBJECT_SHAPE) -> np.ndarray:
    """Subject IoU: best mask IoU with ``shape``'s silhouette, per image, in [0, 1]."""
    return np.array([best_iou(foreground_mask(image), shape) for image in as_arrays(images)])


def shape_ious(images, shapes=SHAPES) -> dict[str, np.ndarray]:
    """Best IoU with every shape of the world (or of ``shapes``), per image."""
    masks = [foreground_mask(image) for image in as_arrays(images)]
    return {shape: np.array([best_iou(m, shape) for m in masks]) for shape in shapes}


def recognised_as(images, shape: str, rivals, threshold: float = SUBJECT_THRESHOLD) -> np.ndarray:
    """bool per image: the best IoU with ``shape`` >= ``threshold`` and above the best IoU with every rival."""
    ious = shape_ious(images, (shape, *(s for s in rivals if s != shape)))
    rival = np.max([ious[s] for s in ious if s != shape], axis=0)
    return (ious[shape] >= threshold) & (ious[shape] > rival)


def recognised_as_subject(images) -> np.ndarray:
    """bool per image: Subject IoU >= SUBJECT_THRESHOLD and above the best IoU with every base shape."""
    return recognised_as(images, SUBJECT_SHAPE, BASE_SHAPES)


def palette_histogram(image: np.ndarray, bins: int = 4) -> np.ndarray:
    index = np.clip((image * bins).astype(int), 0, bins - 1)
    flat = (index[..., 0] * bins + index[..., 1]) * bins + index[..., 2]
    histogram = np.bincount(flat.ravel(), minlength=bins**3).astype(np.float64)
    return histogram / histogram.sum()


def _shifted_pairs(array: np.ndarray, dy: int, dx: int):
    """(a, b): ``array`` and ``array`` shifted by (dy, dx), cropped to where both exist (dy >= 0)."""
    h, w = array.shape[:2]
    x0, x1 = max(0, -dx), w - max(0, dx)
    return array[0:h - dy, x0:x1], array[dy:h, x0 + dx:x1 + dx]


def texture_statistics(image: np.ndarray) -> np.ndarray:
    """Mean absolute colour difference between foreground pixels and their neighbours at ``OFFSETS``."""
    mask = foreground_mask(image)
    stats = []
    for dy, dx in OFFSETS:
        a, b = _shifted_pairs(image, dy, dx)
        ma, mb = _shifted_pairs(mask, dy, dx)
        both = ma & mb
        stats.append(float(np.abs(a - b).sum(-1)[both].mean()) if both.any() else 0.0)
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
    """Style Fid: palette + texture agreement with ``style``, per image, in [0, 1]."""
    if style not in _REFERENCES:
        _REFERENCES[style] = StyleReference(style)
    reference = _REFERENCES[style]
    return np.array([reference.score(image) for image in as_arrays(images)])


def carries(images, style: str, rivals, threshold: float = STYLE_THRESHOLD) -> np.ndarray:
    """bool per image: Style Fid against ``style`` >= ``threshold`` and above its Style Fid against every rival."""
    arrays = as_arrays(images)
    fid = style_fidelity(arrays, style)
    rival = np.max([style_fidelity(arrays, other) for other in rivals if other != style], axis=0)
    return (fid >= threshold) & (fid > rival)


def carries_style(images) -> np.ndarray:
    """bool per image: Style Fid >= STYLE_THRESHOLD and above its Style Fid against every base style."""
    return carries(images, HELD_STYLE, BASE_STYLES)


def joint_success(images) -> np.ndarray:
    """bool per image: recognised as the subject and carrying the style, in the same image (issue 24's headline)."""
    arrays = as_arrays(images)
    return recognised_as_subject(arrays) & carries_style(arrays)


TRANSPARENT_METRICS = ("joint", "subject_iou", "style_fid")


def transparent_scores(images) -> dict:
    """Per image: joint success (1.0 or 0.0), Subject IoU and Style Fid."""
    arrays = as_arrays(images)
    return {"joint": joint_success(arrays).astype(np.float64), "subject_iou": subject_fidelity(arrays),
            "style_fid": style_fidelity(arrays)}
