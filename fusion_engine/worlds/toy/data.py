"""Procedural 32x32 RGB images of shapes x styles, with captions. Deterministic given a seed.

A style is a palette (background, two foreground colours) and a texture (which of the two foreground colours
each pixel of the shape takes); it never changes the shape. The background is plain, so a shape's silhouette
is recoverable from pixels.

The base model sees six primitive shapes in five styles. Held out of it:

* the subject, a **mushroom** ("a sks mushroom"): a multi-part object (a dome cap with three spots on a
  narrow stem) in its own colours (red cap, white spots, tan stem) that no base style uses;
* the style **zzt** ("an image in zzt style"): magenta and teal diagonal stripes on a pale blue-grey ground.
"""
from __future__ import annotations

import numpy as np
import torch

from ...errors import OptionError

SIZE = 32
RADIUS = 11.0  # a shape spans about 2 * RADIUS pixels
BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SUBJECT_SHAPE, SUBJECT_TOKEN = "mushroom", "sks"
SHAPES = (*BASE_SHAPES, SUBJECT_SHAPE)
EXTRA_SHAPES = ("star", "moon", "hourglass", "tee")  # drawn by ``parts``; used only by the second world (v2.py)
STYLES = {  # name: (background, colour A, colour B, texture)
    "stripes": ((0.08, 0.08, 0.30), (0.98, 0.85, 0.20), (0.95, 0.95, 0.95), "hstripes"),
    "bars": ((0.95, 0.93, 0.82), (0.10, 0.45, 0.20), (0.55, 0.85, 0.35), "vstripes"),
    "checker": ((0.05, 0.05, 0.05), (0.20, 0.80, 0.30), (0.95, 0.95, 0.95), "checker"),
    "dots": ((0.30, 0.15, 0.05), (0.95, 0.60, 0.10), (0.20, 0.30, 0.95), "dots"),
    "plain": ((0.00, 0.00, 0.00), (0.85, 0.85, 0.85), (0.85, 0.85, 0.85), "solid"),
    "zzt": ((0.80, 0.85, 0.90), (0.85, 0.10, 0.70), (0.10, 0.70, 0.75), "diagonal"),
}
# The second world's extra base styles (worlds/toy/v2.py); ``render`` draws them, the first world never uses them.
EXTRA_STYLES = {
    "grid": ((0.55, 0.05, 0.05), (0.95, 0.95, 0.60), (0.10, 0.10, 0.10), "grid"),
    "rings": ((0.90, 0.90, 0.20), (0.30, 0.00, 0.50), (0.95, 0.45, 0.00), "rings"),
    "waves": ((0.00, 0.25, 0.25), (0.95, 0.50, 0.50), (0.50, 0.95, 0.95), "waves"),
}
ALL_STYLES = {**STYLES, **EXTRA_STYLES}
HELD_STYLE, STYLE_TOKEN = "zzt", "zzt"
BASE_STYLES = tuple(s for s in STYLES if s != HELD_STYLE)
# The subject's own look (its DreamBooth images): colours per part, on the plain style's black ground.
SUBJECT_LOOK = "own"
SUBJECT_BACKGROUND = (0.0, 0.0, 0.0)
SUBJECT_COLOURS = {"cap": (0.85, 0.10, 0.10), "spots": (0.97, 0.97, 0.95), "stem": (0.90, 0.75, 0.50)}
LOOKS = (*STYLES, SUBJECT_LOOK)  # every way an image can be coloured (the judges see them all)

SUBJECT_PROMPT = f"a {SUBJECT_TOKEN} {SUBJECT_SHAPE}"
STYLE_PROMPT = f"an image in {STYLE_TOKEN} style"
FUSED_PROMPT = f"a {SUBJECT_TOKEN} {SUBJECT_SHAPE} in {STYLE_TOKEN} style"

SHIFTS = (-2, -1, 0, 1, 2)  # the renderer's jitter: centre offset in pixels, size scale
SCALES = (0.9, 1.0, 1.1)


def _grid(cx: float, cy: float):
    ys, xs = np.mgrid[0:SIZE, 0:SIZE].astype(np.float64) + 0.5
    return xs - cx, ys - cy


def parts(shape: str, cx: float = SIZE / 2, cy: float = SIZE / 2, r: float = RADIUS) -> dict[str, np.ndarray]:
    """Named (32, 32) bool masks of ``shape``'s parts (primitives have one part, "body")."""
    x, y = _grid(cx, cy)
    if shape == "mushroom":  # cap: upper half-ellipse; stem: a bar under its middle; spots on the cap
        yc = -0.05 * r
        cap = ((x / r) ** 2 + ((y - yc) / (0.75 * r)) ** 2 <= 1) & (y <= yc)
        stem = (np.abs(x) <= 0.3 * r) & (y > yc) & (y <= yc + 0.85 * r)
        spots = np.zeros_like(cap)
        for sx, sy in ((-0.5, -0.25), (0.05, -0.52), (0.52, -0.22)):
            spots |= (x - sx * r) ** 2 + (y - yc - sy * r) ** 2 <= (0.15 * r) ** 2
        return {"cap": cap & ~spots, "spots": cap & spots, "stem": stem}
    if shape == "circle":
        body = x**2 + y**2 <= (0.85 * r) ** 2
    elif shape == "square":
        body = (np.abs(x) <= r * 0.75) & (np.abs(y) <= r * 0.75)
    elif shape == "diamond":
        body = np.abs(x) + np.abs(y) <= r
    elif shape == "cross":
        w = r * 0.33
        body = ((np.abs(x) <= w) & (np.abs(y) <= r)) | ((np.abs(y) <= w) & (np.abs(x) <= r))
    elif shape == "ring":
        d = x**2 + y**2
        body = (d <= (0.9 * r) ** 2) & (d >= (0.5 * r) ** 2)
    elif shape == "triangle":  # pointing up
        body = (y <= r * 0.8) & (y >= -r) & (np.abs(x) <= (y + r) * 0.6)
    elif shape in EXTRA_SHAPES:  # the second world's base shapes (worlds/toy/v2.py)
        body = _extra_body(shape, x, y, r)
    else:
        raise OptionError(f"unknown shape {shape!r}")
    return {"body": body}


def _extra_body(shape: str, x: np.ndarray, y: np.ndarray, r: float) -> np.ndarray:
    if shape == "star":  # five points: the radius swings between 0.45 r and r with the angle
        angle = np.arctan2(x, -y)
        return np.hypot(x, y) <= r * (0.45 + 0.55 * np.abs(np.cos(2.5 * angle)) ** 3)
    if shape == "moon":  # a disc less a disc shifted right: a crescent opening to the right
        return (x**2 + y**2 <= (0.9 * r) ** 2) & ((x - 0.45 * r) ** 2 + y**2 > (0.75 * r) ** 2)
    if shape == "hourglass":  # two triangles meeting at their tips
        return (np.abs(y) <= 0.9 * r) & (np.abs(x) <= np.abs(y) * 0.75 + 0.08 * r)
    # "tee": a top bar and a stem under its middle
    return (((y >= -0.9 * r) & (y <= -0.5 * r) & (np.abs(x) <= 0.9 * r))
            | ((np.abs(x) <= 0.25 * r) & (y > -0.5 * r) & (y <= 0.9 * r)))


def silhouette(shape: str, cx: float = SIZE / 2, cy: float = SIZE / 2, r: float = RADIUS) -> np.ndarray:
    """(32, 32) bool mask of ``shape`` centred at (cx, cy) with size ``r`` pixels."""
    return np.logical_or.reduce(list(parts(shape, cx, cy, r).values()))


def texture(kind: str, phase: int = 0) -> np.ndarray:
    """(32, 32) bool: True where the shape takes colour B."""
    ys, xs = np.mgrid[0:SIZE, 0:SIZE]
    if kind == "hstripes":
        return ((ys + phase) // 3) % 2 == 1
    if kind == "vstripes":
        return ((xs + phase) // 3) % 2 == 1
    if kind == "checker":
        return (((xs + phase) // 4) + (ys // 4)) % 2 == 1
    if kind == "dots":
        return (((xs + phase) % 6) < 3) & (((ys + phase) % 6) < 3)
    if kind == "diagonal":
        return ((xs + ys + phase) // 3) % 2 == 1
    if kind == "solid":
        return np.zeros((SIZE, SIZE), bool)
    if kind == "grid":  # thin lines every 4 pixels both ways
        return ((xs + phase) % 4 == 0) | ((ys + phase) % 4 == 0)
    if kind == "rings":  # concentric bands around the image centre
        return (np.hypot(xs - SIZE / 2 + 0.5, ys - SIZE / 2 + 0.5).astype(int) + phase) // 2 % 2 == 1
    if kind == "waves":  # horizontal bands bent by a sine
        return ((ys + 2 * np.sin(xs * 2 * np.pi / 8) + phase) // 3).astype(int) % 2 == 1
    raise OptionError(f"unknown texture {kind!r}")


def render(shape: str, look: str, rng: np.random.Generator | None = None, ground=None) -> np.ndarray:
    """(32, 32, 3) float32 in [0, 1]. ``look`` is a style name or ``"own"`` (the subject's part colours; any
    other shape in the cap's red). ``rng`` jitters position (+-2 px), size (x0.9-1.1), texture phase, and adds
    a little pixel noise. ``ground``: the plain ground's RGB for the ``"own"`` look (default the subject's
    black, ``SUBJECT_BACKGROUND``); a style brings its own ground, so any other look refuses it."""
    if ground is not None and look != SUBJECT_LOOK:
        raise OptionError(f"render: ground= is for the {SUBJECT_LOOK!r} look; the {look!r} style has its own ground")
    if rng is None:
        cx = cy = SIZE / 2
        r, phase, noise = RADIUS, 0, 0.0
    else:
        cx, cy = SIZE / 2 + rng.integers(-2, 3), SIZE / 2 + rng.integers(-2, 3)
        r, phase, noise = RADIUS * float(rng.uniform(0.9, 1.1)), int(rng.integers(0, 6)), 0.02
    pieces = parts(shape, cx, cy, r)
    if look == SUBJECT_LOOK:
        image = np.broadcast_to(np.array(SUBJECT_BACKGROUND if ground is None else ground), (SIZE, SIZE, 3)).copy()
        for name, mask in pieces.items():
            image[mask] = SUBJECT_COLOURS.get(name, SUBJECT_COLOURS["cap"])
    else:
        background, a, b, kind = ALL_STYLES[look]
        mask = np.logical_or.reduce(list(pieces.values()))
        fg = np.where(texture(kind, phase)[..., None], np.array(b), np.array(a))
        image = np.where(mask[..., None], fg, np.array(background))
    if noise:
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


def base_dataset(per_combo: int = 60, seed: int = 0, drop: float = 0.15, combos=None):
    """(N, 3, 32, 32) tensor in [-1, 1] and captions for every base shape x base style (held-outs excluded), or
    for the (shape, style) pairs of ``combos`` (the second world's seen combinations), in that order.

    With probability ``drop`` each the shape or the style is left out of a caption, and 10% of captions are
    empty (for classifier-free guidance)."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for shape, style in combos if combos is not None else [(a, b) for a in BASE_SHAPES for b in BASE_STYLES]:
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


def autoencoder_dataset(per_combo: int = 12, seed: int = 3) -> torch.Tensor:
    """Every shape x every look, held-outs included: the VAE is the world's generic image codec (as SD's VAE is
    trained on far more than any LoRA's subject); only the diffusion model never sees the held-outs."""
    rng = np.random.default_rng(seed)
    return to_tensor([render(shape, look, rng) for shape in SHAPES for look in LOOKS for _ in range(per_combo)])


def subject_dataset(count: int = 12, seed: int = 1):
    """DreamBooth images: the mushroom in its own colours, ``count`` jittered renders, "a sks mushroom"."""
    rng = np.random.default_rng(seed)
    images = [render(SUBJECT_SHAPE, SUBJECT_LOOK, rng) for _ in range(count)]
    return to_tensor(images), [SUBJECT_PROMPT] * count


def style_dataset(per_shape: int = 6, seed: int = 2, shapes=BASE_SHAPES):
    """The held-out style on the base shapes (or ``shapes``), "a circle in zzt style" or "an image in zzt style"."""
    rng = np.random.default_rng(seed)
    images, captions = [], []
    for shape in shapes:
        for i in range(per_shape):
            images.append(render(shape, HELD_STYLE, rng))
            captions.append(STYLE_PROMPT if i % 2 else f"a {shape} in {STYLE_TOKEN} style")
    return to_tensor(images), captions


def to_tensor(images) -> torch.Tensor:
    """list of (32, 32, 3) arrays in [0, 1] -> (N, 3, 32, 32) float32 in [-1, 1]."""
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous() * 2 - 1
