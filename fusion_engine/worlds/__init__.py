"""The embedded worlds behind one seam, ``load_world``:

* ``"toy"``: the trained toy world shipped in ``fusion_engine/worlds/toy/weights`` (a tiny text-to-image model
  of 32x32 shapes x styles, a subject LoRA for a held-out mushroom and a style LoRA for a held-out style; see
  ``fusion_engine.worlds.toy``);
* ``"random"``: a tiny SD-style pipeline and two LoRA files of random weights, built with fixed seeds
  (``fusion_engine.worlds.random``; what the unit tests use: fast, and no file needed).

``"auto"`` (the default) is the toy world when its weights are present, else the random one.

Worlds sit beside the engine: they import it, it never imports them (``tests/test_layout.py``).
"""
from __future__ import annotations

from ..errors import OptionError
from .base import World, assemble_pipeline

WORLDS = ("auto", "toy", "random")


def resolve_world(name: str = "auto") -> str:
    """``"toy"`` or ``"random"``: what ``name`` means on this install."""
    if name not in WORLDS:
        raise OptionError(f"unknown world {name!r}: use 'auto', 'toy' or 'random'")
    if name == "auto":
        from .toy.world import toy_weights_present  # lazily: the toy world imports this package's helpers

        return "toy" if toy_weights_present() else "random"
    return name


def load_world(name: str = "auto", folder=None, seed: int = 0) -> World:
    """Load an embedded world.

    Args:
        name: ``"auto"``, ``"toy"`` or ``"random"`` (see the module docstring).
        folder: where the random world writes its two LoRA files (the toy world reads its own where they ship).
        seed: the random world's seed.

    Example:
        >>> from fusion_engine import FusionPipeline
        >>> from fusion_engine.worlds import load_world
        >>> world = load_world("random", folder="demo_out/loras")
        >>> pipe = FusionPipeline.from_pipe(world.pipe, world.subject(), world.style())
    """
    if resolve_world(name) == "toy":
        from .toy.world import load_toy_world

        return load_toy_world()
    if folder is None:
        raise OptionError("load_world('random') writes its two LoRA files: give folder=")
    from .random import load_random_world

    return load_random_world(folder, seed)


__all__ = ["WORLDS", "World", "assemble_pipeline", "load_world", "resolve_world"]
