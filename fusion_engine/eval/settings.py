"""``EvalSettings``: everything one evaluation run needs, built by ``fusion-engine eval`` or by hand."""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OptionError

DEFAULT_POLICIES = ("direct", "klora", "blora", "fls", "fls+llr")
# What a rerun into an OUT made with other settings does: refuse (default), resume anyway, or move the old
# results aside and start over (see recorded.py).
MISMATCH_CHOICES = ("refuse", "resume", "restart")


@dataclass(kw_only=True)
class EvalSettings:
    """What ``fusion_engine.eval.run`` does.

    Args:
        out: the output folder (images/, references/, scores/, report.md).
        pairs: a pairs.toml path, or ``None`` to have ``make_pairs(out / "default_pairs", unet=unet)`` write one.
        make_pairs: ``(folder, unet=) -> pairs.toml path``, used when ``pairs`` is ``None`` (e.g.
            ``fusion_engine.worlds.random.write_random_pairs``).
        pipe: a loaded diffusers pipeline; or
        model: a local diffusers pipeline folder, loaded in ``dtype`` (default float16 on CUDA, else float32).
        clip, dino: loaded encoders (``fusion_engine.scoring.encoders``); or
        clip_model, clip_checkpoint, dino_model, dino_checkpoint: what to load (an OpenCLIP name or config
            dict, a timm name; local checkpoints); with none of the four, tiny random encoders are used.
        device: default ``cuda:LOCAL_RANK`` when CUDA is there, else cpu.
        policies: any policy name, ``+llr`` adds Latent-Level Refinement.
        seeds: seeds ``0..seeds-1`` per pair and policy.
        through_unet: LLR's gradient through the UNet (``False``: the noise prediction is a constant).
        wait_timeout: sharded runs: how long rank 0 waits for the other shards' rows before reporting.
        report_only: only build report.md from the rows that exist.
        extra_scores: ``PIL image -> {metric: (1,) array}``, e.g. the toy world's transparent measures.
        model_label, encoders_label: what the report calls the model and the encoders.
        notes: more lines for the report's header.
        on_mismatch: when OUT/settings.json records other settings (steps, guidance, size, model, LoRA files,
            policy options, ...): "refuse" (default: an ``OptionError`` naming each difference), "resume" (keep
            the old rows; the report says which settings differ) or "restart" (move the old results to
            OUT/superseded/<time>/ and start over).

    Example:
        >>> from fusion_engine.eval import EvalSettings, run
        >>> run(EvalSettings(out="eval_out", model="./sd15", pairs="pairs.toml", clip_model="ViT-B-32",
        ...                  clip_checkpoint="clip.safetensors", dino_model="vit_base_patch16_224.dino",
        ...                  dino_checkpoint="dino.safetensors", seeds=2, steps=30))
    """

    out: Path
    pairs: Path | str | None = None
    make_pairs: Callable | None = None
    pipe: object = None
    model: Path | str | None = None
    dtype: object = None  # a torch.dtype
    clip: object = None
    dino: object = None
    clip_model: str | dict | None = None
    clip_checkpoint: Path | str | None = None
    dino_model: str | None = None
    dino_checkpoint: Path | str | None = None
    device: str | None = None
    policies: list[str] = field(default_factory=lambda: list(DEFAULT_POLICIES))
    seeds: int = 10
    steps: int = 50
    guidance: float = 5.0
    height: int | None = None
    width: int | None = None
    backend: str = "auto"
    divergence: str = "kl"
    m: float = 10.0
    through_unet: bool = True
    wait_timeout: float = 3600.0
    report_only: bool = False
    progress: bool = False
    extra_scores: Callable | None = None
    model_label: str | None = None
    encoders_label: str | None = None
    notes: list[str] = field(default_factory=list)

    on_mismatch: str = "refuse"

    def __post_init__(self):
        self.out = Path(self.out)
        check_int("seeds", self.seeds, 1)
        check_int("steps", self.steps, 1)
        check_float("guidance", self.guidance, 0.0)
        check_float("m", self.m, 0.0)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 8, multiple_of=8)
        if self.on_mismatch not in MISMATCH_CHOICES:
            raise OptionError(f"on_mismatch={self.on_mismatch!r}: use one of {', '.join(MISMATCH_CHOICES)}")


def check_int(name: str, value, minimum: int, multiple_of: int = 1) -> int:
    """``value`` as an int ``>= minimum`` (and a multiple of ``multiple_of``), else an ``OptionError`` naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple_of:
        rule = f"an integer >= {minimum}" + (f" and a multiple of {multiple_of}" if multiple_of > 1 else "")
        raise OptionError(f"{name} must be {rule}, got {value!r}")
    return value


def check_float(name: str, value, minimum: float) -> float:
    """``value`` as a finite float ``>= minimum``, else an ``OptionError`` naming it."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number) or number < minimum:
        raise OptionError(f"{name} must be a finite number >= {minimum:g}, got {value!r}")
    return number
