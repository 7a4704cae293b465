"""The second toy world (issue 24): a world where fusion can be shown, designed before any of it was trained.

What changes from the first world (``data.py``, which stays as it is):

* **More shapes, styles and combinations, some held out.** 10 base shapes (the first world's 6 and star, moon,
  hourglass, tee) x 8 base styles (the first world's 5 and grid, rings, waves) = 80 combinations, of which 20
  (two per shape; every style held out with 2-3 shapes and seen with 7-8) are never shown to the base model, not
  even under a shape-only or style-only caption: the base composition gate asks the base to draw them.
* **Captions separate shape and style words**: ``a circle in stripes style``, ``a circle``, ``an image in
  stripes style`` (the first world's templates; the shape word and the style word each stand alone in some).
* **A world-sized vocabulary** (``VOCABULARY``; ``worlds/tokenizer.world_tokenizer``): every word of every
  caption and prompt is one token; the text encoder's table shrinks from 49,408 rows to ``len(VOCABULARY)``.
* The subject (``a sks mushroom``), the held-out style (``zzt``) and the three prompts are the first world's.

The weights, recipe and gates: ``training/toy/GATES_V2.md`` (fixed before training), ``scripts/
train_toy_world_v2.sh``.
"""
from __future__ import annotations

import numpy as np

from . import data
from .data import HELD_STYLE, SUBJECT_SHAPE, SUBJECT_TOKEN, render, to_tensor

BASE_SHAPES = (*data.BASE_SHAPES, *data.EXTRA_SHAPES)
BASE_STYLES = (*data.BASE_STYLES, *data.EXTRA_STYLES)
SHAPES = (*BASE_SHAPES, SUBJECT_SHAPE)  # every shape the measures tell apart (rivals)
STYLES = (*BASE_STYLES, HELD_STYLE)  # every style the measures tell apart (rivals)
LOOKS = (*STYLES, "own")  # every way an image can be coloured (the judges see them all)


def _held_combos() -> tuple[tuple[str, str], ...]:
    """Shape i is held out in base styles i and i + 3 (mod 8): two per shape, 2-3 per style."""
    count = len(BASE_STYLES)
    return tuple((shape, BASE_STYLES[k % count]) for i, shape in enumerate(BASE_SHAPES) for k in (i, i + 3))


HELD_COMBOS = _held_combos()
SEEN_COMBOS = tuple((shape, style) for shape in BASE_SHAPES for style in BASE_STYLES
                    if (shape, style) not in HELD_COMBOS)
CAPTION_WORDS = ("a", "an", "image", "in", "style")
VOCABULARY = (*CAPTION_WORDS, *SHAPES, *STYLES, SUBJECT_TOKEN)  # STYLES holds the style token (zzt)


def base_dataset(per_combo: int = 40, seed: int = 0, drop: float = 0.15):
    """(N, 3, 32, 32) in [-1, 1] and captions for the seen combinations only (held-out combinations, the
    subject and the held-out style never appear, in images or captions); captions as ``data.base_dataset``'s."""
    return data.base_dataset(per_combo, seed, drop, combos=SEEN_COMBOS)


def autoencoder_dataset(per_combo: int = 6, seed: int = 3):
    """Every shape x every look, held-outs included (the VAE is the world's generic codec, as in the first world)."""
    rng = np.random.default_rng(seed)
    return to_tensor([render(shape, look, rng) for shape in SHAPES for look in LOOKS for _ in range(per_combo)])


SUBJECT_GROUND_MARGIN = 0.35  # RGB distance (images in [0, 1]) a subject's ground keeps from the colours it avoids
_GROUND_AVOIDS = np.array([*data.SUBJECT_COLOURS.values(), *data.STYLES[HELD_STYLE][:3]])  # (6, 3) RGB


def subject_ground(rng: np.random.Generator) -> tuple[float, float, float]:
    """A plain ground for the subject's own look: uniform in RGB, drawn again while it lies within
    ``SUBJECT_GROUND_MARGIN`` of a colour of the subject (cap, spots, stem: the mushroom stays visible on it) or of
    the held-out style (its ground and two colours: the subject's data shows nothing of zzt)."""
    while True:
        colour = rng.uniform(0.0, 1.0, 3)
        if np.linalg.norm(_GROUND_AVOIDS - colour, axis=1).min() >= SUBJECT_GROUND_MARGIN:
            return tuple(float(v) for v in colour)


def subject_dataset(count: int = 12, seed: int = 1):
    """DreamBooth images, "a sks mushroom": the first world's ``count`` jittered renders of the mushroom in its own
    colours (the same positions and sizes), each on a plain ground of its own (``subject_ground``), as real
    DreamBooth photos have varied backgrounds. From run 3 (training/toy/gates_v2_spec.json "runs"): run 2's
    subject, all on black, composed only with dark-ground styles (training/toy/runs/v2_run2/REPORT.md, gate 7)."""
    jitter, grounds = np.random.default_rng(seed), np.random.default_rng(seed + 1000)
    images = [render(SUBJECT_SHAPE, data.SUBJECT_LOOK, jitter, ground=subject_ground(grounds)) for _ in range(count)]
    return to_tensor(images), [data.SUBJECT_PROMPT] * count


def style_dataset(per_shape: int = 4, seed: int = 2):
    """The held-out style on this world's 10 base shapes (40 images), captioned as ``data.style_dataset``'s."""
    return data.style_dataset(per_shape, seed, shapes=BASE_SHAPES)


# Architectures. The UNet and the VAE are the first world's (its 4.2M-parameter UNet draws crisp shapes and
# textures; a wider one would cost CPU time the next training session does not have); the text encoder is the
# first world's with a world-sized vocabulary (610 rows instead of 49,408: 3.1M fewer parameters, 12.5 MB).
def base_configs() -> dict:
    """{unet, text_encoder, tokenizer}: what ``train_base --world v2`` builds and writes to base_config.json."""
    from ..tokenizer import world_tokenizer
    from . import configs

    tokenizer = world_tokenizer(VOCABULARY)
    text_encoder = dict(configs.TEXT_ENCODER, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return {"world": "v2", "unet": dict(configs.UNET), "text_encoder": text_encoder,
            "tokenizer": {"words": list(VOCABULARY)}}


def recognised_as_subject(images):
    """bool per image: the mushroom, against every base shape of this world (``measures.recognised_as``)."""
    from . import measures

    return measures.recognised_as(images, SUBJECT_SHAPE, BASE_SHAPES)


def carries_style(images, style: str = HELD_STYLE):
    """bool per image: ``style`` (default the held-out zzt), against every other style of this world."""
    from . import measures

    return measures.carries(images, style, STYLES)


def transparent_scores(images) -> dict:
    """As ``measures.transparent_scores``, with this world's rivals in the joint-success decision."""
    from . import measures

    arrays = measures.as_arrays(images)
    joint = recognised_as_subject(arrays) & carries_style(arrays)
    return {"joint": joint.astype(np.float64), "subject_iou": measures.subject_fidelity(arrays),
            "style_fid": measures.style_fidelity(arrays)}
