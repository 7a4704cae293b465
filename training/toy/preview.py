"""Look at what a toy world folder draws: one row per prompt, one column per seed, upscaled 3x.

    python -m training.toy.preview --weights toy_weights --out preview.png [--roles base,subject,style,both]
"""
from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from fusion_engine.worlds.toy.data import BASE_SHAPES, BASE_STYLES, caption
from fusion_engine.worlds.toy.sampling import sample
from fusion_engine.worlds.toy.world import load_toy_world

from .common import adapt_threads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--roles", default="base")
    parser.add_argument("--base-rows", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    adapt_threads(2)
    roles = args.roles.split(",")
    world = load_toy_world(args.weights, require_loras=roles != ["base"])
    rows = []
    if "base" in roles:
        prompts = [caption(shape, style) for shape, style in zip(BASE_SHAPES, BASE_STYLES * 2)][:args.base_rows]
        prompts += [world.prompt]
        rows += [sample(world, "base", range(args.seeds), prompt=p, steps=args.steps) for p in prompts]
    rows += [sample(world, role, range(args.seeds), steps=args.steps) for role in roles if role != "base"]
    grid = np.concatenate([np.concatenate([np.asarray(i) for i in row], 1) for row in rows], 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
