"""Does the starting noise pick the background? (PILOT_OFFSET_NOISE.md). For each weights folder: six prompts x
seeds 0-19 with the gates' sampler, the calibration's shape / style / joint decisions, and per prompt the largest
|correlation| over the four latent channels between the starting noise's channel mean and the image's ground
brightness.

    PYTHONPATH=. python training/toy/runs/v2_run2/probe_noise_mean.py WEIGHTS [WEIGHTS ...]
"""
import sys
from pathlib import Path

import numpy as np
import torch

from fusion_engine.worlds.base import seed_latents
from fusion_engine.worlds.toy import measures
from fusion_engine.worlds.toy.data import caption
from fusion_engine.worlds.toy.sampling import sample
from fusion_engine.worlds.toy.world import load_toy_world
from training.toy.calibrate import decide, world_tables

COMBOS = [("circle", "checker"), ("cross", "bars"), ("diamond", "stripes"), ("star", "rings"), ("square", "plain"),
          ("moon", "grid")]


def probe(path: Path, tables: dict, seeds: int = 20) -> str:
    world = load_toy_world(path, require_loras=False)
    means = seed_latents(world.pipe, list(range(seeds))).mean(dim=(2, 3)).numpy()
    totals, correlations, styles = {"shape": 0, "style": 0, "joint": 0}, [], []
    for shape, style in COMBOS:
        images = sample(world, "base", range(seeds), prompt=caption(shape, style), steps=20, guidance=5.0)
        decided = decide(images, shape, style, tables["shapes"], tables["styles"])
        ground = np.array([measures.background(a).mean() for a in measures.as_arrays(images)])
        correlations.append(max(abs(np.corrcoef(means[:, k], ground)[0, 1]) for k in range(means.shape[1])))
        styles.append(f"{style}:{int(decided['style_decision'].sum())}")
        for key in totals:
            totals[key] += int(decided[f"{key}_decision"].sum())
    return (f"{path}: of {seeds * len(COMBOS)}: shape {totals['shape']} style {totals['style']} joint "
            f"{totals['joint']} | {' '.join(styles)} | max|corr(noise mean, ground)| per prompt "
            f"{np.round(correlations, 2).tolist()} mean {np.mean(correlations):.2f}")


if __name__ == "__main__":
    torch.set_num_threads(2)
    for folder in sys.argv[1:]:
        print(probe(Path(folder), world_tables("v2")), flush=True)
