"""Procedural 16x16 RGB images of shapes x styles, with captions. Deterministic given a seed.

A style is a palette (background, two foreground colours) and a texture (which of the two foreground colours
each pixel of the shape takes). The background is plain, so a shape's silhouette is recoverable from pixels.
Held out of the base model: the shape ``star`` (the subject, "a sks star") and the style ``diagonal`` (the
style, "zzt style").
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import OptionError

SIZE = 16
SHAPES = ("circle", "square", "triangle", "cross", "diamond", "ring", "star")
STYLES = {  # name: (background, colour A, colour B, texture)
    "stripes": ((0.10, 0.10, 0.35), (0.95, 0.20, 0.15), (0.98, 0.85, 0.20), "hstripes"),
    "bars": ((0.95, 0.95, 0.85), (0.10, 0.45, 0.20), (0.55, 0.85, 0.35), "vstripes"),
    "checker": ((0.05, 0.05, 0.05), (0.20, 0.80, 0.30), (0.95, 0.95, 0.95), "checker"),
    "dots": ((0.30, 0.15, 0.05), (0.95, 0.60, 0.10), (0.20, 0.30, 0.95), "dots"),
    "solid": ((0.00, 0.00, 0.00), (0.92, 0.92, 0.92), (0.92, 0.92, 0.92), "solid"),
    "diagonal": ((0.80, 0.85, 0.90), (0.85, 0.10, 0.70), (0.10, 0.70, 0.75), "diagonal"),
}
SUBJECT_SHAPE, SUBJECT_TOKEN = "star", "sks"
SUBJECT_STYLE = "solid"  # how the subject looks in its DreamBooth images
HELD_STYLE, STYLE_TOKEN = "diagonal", "zzt"
BASE_SHAPES = tuple(s for s in SHAPES if s != SUBJECT_SHAPE)
BASE_STYLES = tuple(s for s in STYLES if s != HELD_STYLE)

TOY_SUBJECT_PROMPT = f"a {SUBJECT_TOKEN} {SUBJECT_SHAPE}"
TOY_STYLE_PROMPT = f"an image in {STYLE_TOKEN} style"
TOY_FUSED_PROMPT = f"a {SUBJECT_TOKEN} {SUBJECT_SHAPE} in {STYLE_TOKEN} style"


def _grid(cx: float, cy: float):
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    return xs - cx, ys - cy


def silhouette(shape: str, cx: float = SIZE / 2, cy: float = SIZE / 2, r: float = 6.0) -> np.ndarray:
    """(16, 16) bool mask of ``shape`` centred at (cx, cy) with radius ``r`` pixels."""
    x, y = _grid(cx, cy)
    if shape == "circle":
        return x**2 + y**2 <= r**2
    if shape == "square":
        return (np.abs(x) <= r * 0.8) & (np.abs(y) <= r * 0.8)
    if shape == "diamond":
        return np.abs(x) + np.abs(y) <= r
    if shape == "cross":
        w = r * 0.35
        return ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    if shape == "ring":
        d = x**2 + y**2
        return (d <= r**2) & (d >= (r * 0.55) ** 2)
    if shape == "triangle":  # pointing up
        return (y <= r * 0.8) & (y >= -r) & (np.abs(x) <= (y + r) * 0.55)
    if shape == "star":  # five points, polar radius alternates between r and 0.45 r
        theta = np.arctan2(x, -y)
        rho = np.hypot(x, y)
        k = (theta % (2 * math.pi / 5)) / (2 * math.pi / 5)  # 0..1 within one point's sector
        edge = r * (0.42 + 0.58 * np.abs(1 - 2 * k))
        return rho <= edge
    raise OptionError(f"unknown shape {shape!r}")


def texture(kind: str, phase: int = 0) -> np.ndarray:
    """(16, 16) bool: True where the shape takes colour B."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "hstripes":
        return ((ys + phase) // 2) % 2 == 1
    if kind == "vstripes":
        return ((xs + phase) // 2) % 2 == 1
    if kind == "checker":
        return (((xs + phase) // 2) + (ys // 2)) % 2 == 1
    if kind == "dots":
        return (((xs + phase) % 4) < 2) & (((ys + phase) % 4) < 2)
    if kind == "diagonal":
        return ((xs + ys + phase) // 2) % 2 == 1
    if kind == "solid":
        return np.zeros((SIZE, SIZE), bool)
    raise OptionError(f"unknown texture {kind!r}")


def render(shape: str, style: str, rng: np.random.Generator | None = None) -> np.ndarray:
    """(16, 16, 3) float32 in [0, 1]; ``rng`` jitters position (+-1 px), size and texture phase."""
    if rng is None:
        cx = cy = SIZE / 2
        r, phase, noise = 6.0, 0, 0.0
    else:
        cx, cy = SIZE / 2 + rng.integers(-1, 2), SIZE / 2 + rng.integers(-1, 2)
        r, phase, noise = float(rng.uniform(5.3, 6.7)), int(rng.integers(0, 4)), 0.02
    background, a, b, kind = STYLES[style]
    mask = silhouette(shape, cx, cy, r)
    fg = np.where(texture(kind, phase)[..., None], np.array(b), np.array(a))
    image = np.where(mask[..., None], fg, np.array(background))
    if noise and rng is not None:
        image = image + rng.normal(0, noise, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def caption(shape: str | None, style: str | None) -> str:
    """"a circle in stripes style"; a missing part is dropped ("a circle", "an image in dots style")."""
    if shape is None and style is None:
        return ""
    if style is None:
        return f"a {shape}"
    if shape is None:
        return f"an image in {style} style"
    return f"a {shape} in {style} style"


def base_dataset(per_combo: int = 40, seed: int = 0, drop: float = 0.15):
    """(N, 3, 16, 16) tensor in [-1, 1] and captions for every base shape x base style (held-outs excluded).

    With probability ``drop`` each the shape or the style is left out of a caption, and 10% of captions are
    empty (for classifier-free guidance)."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for shape in BASE_SHAPES:
        for style in BASE_STYLES:
            for _ in range(per_combo):
                images.append(render(shape, style, rng))
                u = rng.random()
                if u < 0.10:
                    captions.append("")
                elif u < 0.10 + drop:
                    captions.append(caption(shape, None))
                elif u < 0.10 + 2 * drop:
                    captions.append(caption(None, style))
                else:
                    captions.append(caption(shape, style))
    return to_tensor(images), captions


def autoencoder_dataset(per_combo: int = 20, seed: int = 3) -> torch.Tensor:
    """Every shape x every style, held-outs included: the VAE is the world's generic image codec (as SD's
    VAE is trained on far more than any LoRA's subject); only the diffusion model never sees the held-outs."""
    rng = np.random.default_rng(seed)
    return to_tensor([render(shape, style, rng) for shape in SHAPES for style in STYLES for _ in range(per_combo)])


def subject_dataset(count: int = 6, seed: int = 1):
    """DreamBooth images: the held-out shape, plain, ``count`` jittered renders, captioned "a sks star"."""
    rng = np.random.default_rng(seed)
    images = [render(SUBJECT_SHAPE, SUBJECT_STYLE, rng) for _ in range(count)]
    return to_tensor(images), [TOY_SUBJECT_PROMPT] * count


def style_dataset(per_shape: int = 4, seed: int = 2):
    """The held-out style on the base shapes, captioned "a circle in zzt style" (or "an image in zzt style")."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for shape in BASE_SHAPES:
        for i in range(per_shape):
            images.append(render(shape, HELD_STYLE, rng))
            captions.append(TOY_STYLE_PROMPT if i % 2 else f"a {shape} in {STYLE_TOKEN} style")
    return to_tensor(images), captions


def to_tensor(images) -> torch.Tensor:
    """list of (16, 16, 3) arrays in [0, 1] -> (N, 3, 16, 16) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() * 2 - 1
