"""Calibrate the toy world's shape and style measures on the base model's own images (issue 24, gate spec v2).

The base samples ``a {shape} in {style} style`` for every seen combination (a base shape x a base style it was
trained on), ``--seeds`` images each; for each image the transparent measures decide whether it shows the asked
shape and carries the asked style. A gate in ``training/toy/GATES_V2.md`` is a fixed fraction of the rates this
tool measures, so the gates never ask more of a LoRA or a fusion than the base model itself achieves.

Per measure, three rates (each with a 95% bootstrap interval over the images):

* ``decision``: the world's two-part decision, the one the gates use (shape: best IoU >= 0.6 and above every
  rival shape's; style: Style Fid >= 0.6 and above every rival style's), as ``recognised_as_subject`` /
  ``carries_style`` are for the mushroom and zzt;
* ``highest``: the asked shape (style) scores highest among the rivals, no threshold;
* ``threshold``: the asked shape's IoU (style's Style Fid) >= 0.6, no rivals.

Rivals: every shape (style) of the world, the held-out subject shape (style) included.

    python -m training.toy.calibrate [--weights DIR] [--world v1|v2] [--seeds 4] [--combos seen|held]
        [--out calibration.json]
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from fusion_engine.scoring.stats import bootstrap_ci
from fusion_engine.worlds.toy import measures
from fusion_engine.worlds.toy.data import caption

from .common import log


def world_tables(world: str) -> dict:
    """{seen, held, shapes, styles}: the (shape, style) combinations and the rival sets of ``world``."""
    if world == "v1":
        from fusion_engine.worlds.toy import data

        seen = [(shape, style) for shape in data.BASE_SHAPES for style in data.BASE_STYLES]
        return {"seen": seen, "held": [], "shapes": data.SHAPES, "styles": tuple(data.STYLES)}
    from fusion_engine.worlds.toy import v2

    return {"seen": list(v2.SEEN_COMBOS), "held": list(v2.HELD_COMBOS), "shapes": v2.SHAPES,
            "styles": v2.STYLES}


def decide(images, shape: str, style: str, shapes, styles) -> dict[str, np.ndarray]:
    """Per image, 0/1 for each rate this tool reports (see the module docstring)."""
    arrays = measures.as_arrays(images)
    ious = measures.shape_ious(arrays, shapes)
    fids = {s: measures.style_fidelity(arrays, s) for s in styles}
    shape_rival = np.max([ious[s] for s in shapes if s != shape], axis=0)
    style_rival = np.max([fids[s] for s in styles if s != style], axis=0)
    shape_ok = ious[shape] >= measures.SUBJECT_THRESHOLD
    style_ok = fids[style] >= measures.STYLE_THRESHOLD
    out = {"shape_decision": shape_ok & (ious[shape] > shape_rival), "shape_highest": ious[shape] > shape_rival,
           "shape_threshold": shape_ok, "style_decision": style_ok & (fids[style] > style_rival),
           "style_highest": fids[style] > style_rival, "style_threshold": style_ok}
    out["joint_decision"] = out["shape_decision"] & out["style_decision"]
    return {key: value.astype(np.float64) for key, value in out.items()}


def rates(per_image: dict[str, list]) -> dict:
    """{rate name: [mean, low, high]} over the images (95% percentile bootstrap, seeded)."""
    return {key: [round(v, 4) for v in bootstrap_ci(np.asarray(values))] for key, values in per_image.items()}


def calibrate(world, tables: dict, combos: list, seeds: int, steps: int, guidance: float) -> dict:
    from fusion_engine.worlds.toy.sampling import sample

    pooled: dict[str, list] = {}
    by_shape: dict[str, dict[str, list]] = {}
    by_style: dict[str, dict[str, list]] = {}
    per_combo = {}
    for index, (shape, style) in enumerate(combos):
        start = time.perf_counter()
        images = sample(world, "base", range(seeds), prompt=caption(shape, style), steps=steps, guidance=guidance)
        decided = decide(images, shape, style, tables["shapes"], tables["styles"])
        for key, values in decided.items():
            pooled.setdefault(key, []).extend(values)
            by_shape.setdefault(shape, {}).setdefault(key, []).extend(values)
            by_style.setdefault(style, {}).setdefault(key, []).extend(values)
        per_combo[f"{shape}/{style}"] = {key: int(values.sum()) for key, values in decided.items()}
        log(f"[{index + 1}/{len(combos)}] {caption(shape, style)!r}: shape {int(decided['shape_decision'].sum())}"
            f"/{seeds}, style {int(decided['style_decision'].sum())}/{seeds} "
            f"({time.perf_counter() - start:.1f} s)")
    return {"rates": rates(pooled), "per_shape": {k: rates(v) for k, v in by_shape.items()},
            "per_style": {k: rates(v) for k, v in by_style.items()}, "per_combo_counts": per_combo,
            "images": len(pooled["joint_decision"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=None, help="the world's weights folder (default: the shipped toy world)")
    parser.add_argument("--world", choices=["v1", "v2"], default="v1")
    parser.add_argument("--seeds", type=int, default=4, help="images per combination (seeds 0..N-1)")
    parser.add_argument("--combos", choices=["seen", "held"], default="seen")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="calibration.json")
    args = parser.parse_args(argv)
    from fusion_engine.worlds.toy.world import WEIGHTS, load_toy_world

    torch.set_num_threads(args.threads)
    tables = world_tables(args.world)
    combos = tables[args.combos]
    if not combos:
        parser.error(f"world {args.world} has no {args.combos} combinations")
    weights = Path(args.weights) if args.weights else WEIGHTS
    start = time.perf_counter()
    world = load_toy_world(weights, require_loras=False)
    result = calibrate(world, tables, combos, args.seeds, args.steps, args.guidance)
    wall = time.perf_counter() - start
    result.update({"settings": {"world": args.world, "weights": str(weights), "combos": args.combos,
                                "combinations": len(combos), "seeds_per_combination": args.seeds,
                                "steps": args.steps, "guidance": args.guidance, "sampler": "Euler",
                                "thresholds": {"shape_iou": measures.SUBJECT_THRESHOLD,
                                               "style_fid": measures.STYLE_THRESHOLD}},
                   "wall_s": round(wall, 1),
                   "machine": (f"{torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs, "
                               f"load average at the end {os.getloadavg()[0]:.1f}, torch {torch.__version__}")})
    Path(args.out).write_text(json.dumps(result, indent=1))
    for key, (mean, low, high) in result["rates"].items():
        log(f"{key}: {mean:.3f} [{low:.3f}, {high:.3f}]")
    log(f"wrote {args.out} ({result['images']} images, {wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
