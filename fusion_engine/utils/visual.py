"""Pictures people would rather look at: the selection heatmap and labelled image grids (Pillow only)."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .io import save_image

SUBJECT_RGB = (230, 120, 30)  # orange
STYLE_RGB = (40, 110, 200)  # blue
EMPTY_RGB = (200, 200, 200)
BOTH_HINT = "0.5 = both deltas (direct)"


def _font():
    return ImageFont.load_default()


def _blend(fraction: float):
    if math.isnan(fraction):
        return EMPTY_RGB
    return tuple(round(s * fraction + t * (1 - fraction)) for s, t in zip(SUBJECT_RGB, STYLE_RGB))


def draw_heatmap(fraction: torch.Tensor, layer_names, steps, path, title: str = "") -> Path:
    """``fraction`` is (steps, layers): share of groups that took the subject; one cell per entry."""
    n_steps, n_layers = fraction.shape
    cell_w = max(4, min(24, 900 // max(n_steps, 1)))
    cell_h = max(1, min(14, 900 // max(n_layers, 1)))
    labels = cell_h >= 10
    left = 330 if labels else 60
    top, bottom = 34, 46
    width, height = left + n_steps * cell_w + 10, top + n_layers * cell_h + bottom
    image = Image.new("RGB", (max(width, 420), height), "white")
    draw = ImageDraw.Draw(image)
    font = _font()
    draw.text((4, 4), f"{title}  ({n_layers} layers x {n_steps} steps)", fill="black", font=font)
    for step in range(n_steps):
        for layer in range(n_layers):
            x0, y0 = left + step * cell_w, top + layer * cell_h
            draw.rectangle([x0, y0, x0 + cell_w - 1, y0 + cell_h - 1], fill=_blend(float(fraction[step, layer])))
    if labels:
        for layer, name in enumerate(layer_names):
            short = name.replace("transformer_blocks.", "tb.").replace("attentions.", "att.")
            short = short if len(short) <= 52 else "..." + short[-49:]
            draw.text((4, top + layer * cell_h), short, fill="black", font=font)
    else:
        draw.text((4, top), "layers", fill="black", font=font)
    y = top + n_layers * cell_h + 4
    span = f"steps {steps[0]} .. {steps[-1]} ->" if steps else "steps - .. - ->"
    draw.text((left, y), span, fill="black", font=font)
    for i, (label, rgb) in enumerate((("subject", SUBJECT_RGB), ("style", STYLE_RGB), ("none", EMPTY_RGB))):
        x = 4 + i * 90
        draw.rectangle([x, y + 18, x + 12, y + 30], fill=rgb)
        draw.text((x + 16, y + 18), label, fill="black", font=font)
    draw.text((280, y + 18), BOTH_HINT, fill="black", font=font)
    return save_image(image, path)


def image_grid(rows: list[list[Image.Image]], row_labels: list[str], path, cell: int = 128, title: str = "") -> Path:
    """One labelled row per entry of ``rows`` (a label may span lines); images upscaled (nearest) to ``cell``
    pixels."""
    columns = max(len(r) for r in rows)
    left, top, pad = 150, 22 if title else 4, 4
    width = left + columns * (cell + pad)
    height = top + len(rows) * (cell + pad)
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    if title:
        draw.text((4, 4), title, fill="black", font=font)
    for r, (images, label) in enumerate(zip(rows, row_labels)):
        y = top + r * (cell + pad)
        lines = label.split("\n")  # a label may have several lines: centred on the row
        draw.multiline_text((4, y + cell // 2 - 7 * len(lines)), label, fill="black", font=font, spacing=2)
        for c, img in enumerate(images):
            grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (left + c * (cell + pad), y))
    return save_image(grid, path)
