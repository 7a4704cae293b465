"""Measure the second toy world's gates (``training/toy/GATES_V2.md``, ``gates_v2_spec.json``), fixed before
training, and write them to ``OUT/gates_v2.json``.

    python -m training.toy.measure_gates_v2 --weights OUT [--fusion-seeds 50] [--steps 20]

Reads what the earlier steps of ``scripts/train_toy_world_v2.sh`` wrote to OUT: ``calibration_seen.json`` and
``calibration_held.json`` (``training.toy.calibrate``), ``gates.json`` (``training.toy.measure_gates``: the five
kept gates) and ``times_subject.json`` / ``times_style.json`` (the LoRA recipes). Samples gate 7 (the subject
LoRA alone with each base style) and gate 8 (fusion, through ``fusion_engine.eval``: its rows and report land
in OUT/fusion_gate, resumable) itself. Every number and each gate's verdict goes to the JSON; nothing is tuned.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from fusion_engine.scoring.stats import bootstrap_ci
from fusion_engine.worlds.toy import measures, v2

from .common import log

SPEC = Path(__file__).with_name("gates_v2_spec.json")
KEPT = ("subject_only_recognised", "style_only_carries_style", "base_recognised", "base_carries_style",
        "judges_agree")
RECIPE_FIELDS = ("rank", "alpha", "targets", "steps", "lr", "cosine", "ema", "batch", "prior_share")
POLICIES = ("direct", "fls", "klora", "blora")
FULL, GRID = (1.0, 1.0), ((1.0, 0.7), (1.0, 0.5), (0.7, 1.0), (0.5, 1.0))
BASE_COMPOSITION, SUBJECT_COMPOSITION, FUSION = 0.85, 0.60, 0.30


def _ci(values) -> list[float]:
    return [round(v, 4) for v in bootstrap_ci(np.asarray(values, dtype=np.float64))]


def kept_gates(folder: Path) -> dict:
    gates = json.loads((folder / "gates.json").read_text())["gates"]
    return {name: gates[name] for name in KEPT}


def base_composition(folder: Path) -> dict:
    seen = json.loads((folder / "calibration_seen.json").read_text())["rates"]
    held = json.loads((folder / "calibration_held.json").read_text())["rates"]
    need = BASE_COMPOSITION * seen["joint_decision"][0]
    return {"value": held["joint_decision"], "need": f">= {BASE_COMPOSITION} x R_joint = {need:.4f}, R_joint > 0",
            "pass": need > 0 and held["joint_decision"][0] >= need,
            "reported": {kind: {"held": held[f"{kind}_decision"], "seen": seen[f"{kind}_decision"],
                                "ratio": round(held[f"{kind}_decision"][0] / max(seen[f"{kind}_decision"][0], 1e-9), 4)}
                         for kind in ("shape", "style", "joint")}}


def subject_composition(world, folder: Path, seeds: int, steps: int) -> dict:
    from fusion_engine.worlds.toy.sampling import sample

    calibration = json.loads((folder / "calibration_seen.json").read_text())
    pooled, per_style = [], {}
    for style in v2.BASE_STYLES:
        prompt = f"{world.subject_prompt} in {style} style"
        images = sample(world, "subject", range(seeds), prompt=prompt, steps=steps)
        joint = v2.recognised_as_subject(images) & measures.carries(images, style, v2.STYLES)
        pooled += joint.tolist()
        r_style = calibration["per_style"][style]["style_decision"][0]
        per_style[style] = {"joint": _ci(joint), "need": round(SUBJECT_COMPOSITION * r_style, 4)}
        log(f"gate 7, {prompt!r} with the subject LoRA alone: {int(joint.sum())}/{seeds}")
    need = SUBJECT_COMPOSITION * calibration["rates"]["style_decision"][0]
    return {"value": _ci(pooled), "need": f">= {SUBJECT_COMPOSITION} x R_style = {need:.4f}, R_style > 0",
            "pass": need > 0 and float(np.mean(pooled)) >= need, "per_style": per_style}


def _joint_rates(out: Path, seeds: range) -> dict:
    """{(pair, policy): [mean, low, high]} of joint success over ``seeds`` from the eval rows in ``out``."""
    from fusion_engine.eval.report import read_rows

    values: dict = {}
    for (pair, policy, seed), row in read_rows(out).items():
        if seed in seeds:
            values.setdefault((pair, policy), []).append(float(row["joint"]))
    return {key: _ci(v) for key, v in values.items()}


def fusion_reachable(folder: Path, seeds: int, steps: int) -> dict:
    from fusion_engine.eval import EvalSettings, run
    from fusion_engine.worlds.toy.world import build_toy_pipeline, load_judges, world_scores, write_toy_pairs

    out = folder / "fusion_gate"
    clip, dino = load_judges(folder)
    pairs = write_toy_pairs(out / "pairs", weights=folder)

    def evaluate(policies, scales, count):
        run(EvalSettings(out=out, pairs=pairs, pipe=build_toy_pipeline(folder), clip=clip, dino=dino,
                         extra_scores=world_scores(folder), policies=list(policies), scales=list(scales), seeds=count,
                         steps=steps, guidance=5.0, model_label=str(folder), on_mismatch="refuse"))

    evaluate(POLICIES, [FULL], seeds)
    rates = _joint_rates(out, range(seeds))
    grid_used = max(rate[0] for rate in rates.values()) < FUSION
    if grid_used:
        evaluate(POLICIES, [FULL, *GRID], seeds)
        rates = _joint_rates(out, range(seeds))
    (pair, policy), best = max(rates.items(), key=lambda item: item[1][0])
    confirmed = None
    if best[0] >= FUSION:
        scale = next(s for s in [FULL, *GRID] if pair.endswith(f"@{s[0]:g}x{s[1]:g}"))
        evaluate([policy], [scale], 2 * seeds)  # seeds 0..2N-1: the first N are reused, the next N are fresh
        confirmed = _joint_rates(out, range(seeds, 2 * seeds))[(pair, policy)]
    passed = best[0] >= FUSION and confirmed is not None and confirmed[0] >= FUSION
    return {"value": {"best": {"pair": pair, "policy": policy, "joint": best, "confirmed_on_fresh_seeds": confirmed}},
            "need": f">= {FUSION} in the best cell and again on fresh seeds", "pass": passed,
            "grid_used": grid_used, "cells": {f"{p} {q}": r for (p, q), r in sorted(rates.items())},
            "verdict": "valid" if passed else "NOT VALID for ranking fusion policies (GATES_V2.md)"}


def symmetric_loras(folder: Path) -> dict:
    recipes = {role: json.loads((folder / f"times_{role}.json").read_text()) for role in ("subject", "style")}
    differ = [f for f in RECIPE_FIELDS if recipes["subject"].get(f) != recipes["style"].get(f)]
    norms = folder / "lora_norms.json"
    return {"value": {f: [recipes["subject"].get(f), recipes["style"].get(f)] for f in RECIPE_FIELDS},
            "need": "identical recipe fields", "pass": not differ, "differ": differ,
            "delta_norms": json.loads(norms.read_text())["summary"] if norms.is_file() else None}


def main(argv=None) -> int:
    from fusion_engine.worlds.toy.world import load_toy_world

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--subject-seeds", type=int, default=25)
    parser.add_argument("--fusion-seeds", type=int, default=50)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: WEIGHTS/gates_v2.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    folder, start = Path(args.weights), time.perf_counter()
    gates = {**kept_gates(folder), "base_composition": base_composition(folder)}
    gates["subject_composition"] = subject_composition(load_toy_world(folder), folder, args.subject_seeds, args.steps)
    gates["fusion_reachable"] = fusion_reachable(folder, args.fusion_seeds, args.steps)
    gates["symmetric_loras"] = symmetric_loras(folder)
    result = {"spec": json.loads(SPEC.read_text()), "gates": gates, "all_pass": all(g["pass"] for g in gates.values()),
              "wall_s": round(time.perf_counter() - start, 1),
              "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    out = Path(args.out) if args.out else folder / "gates_v2.json"
    out.write_text(json.dumps(result, indent=1))
    for name, gate in gates.items():
        log(f"gate {name}: {gate['value']} (need {gate['need']}): {'PASS' if gate['pass'] else 'FAIL'}")
    log(f"wrote {out} ({result['wall_s']} s)")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
