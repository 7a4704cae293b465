"""Measure the toy world's validity gates at the demo's settings and write them to ``gates.json``.

    python -m training.toy.measure_gates --weights toy_weights [--seeds 100]

Sets, one image per seed 0..N-1 (Euler, the demo's steps and CFG):
  subject-only (the subject LoRA alone, "a sks mushroom"), style-only (the style LoRA alone, "an image in zzt
  style"), and the base model without LoRAs under the fused prompt "a sks mushroom in zzt style" (it names
  both the subject and the style; ``--all-base`` adds the base model under the subject and the style prompts).
Gates:
  1. subject-only images recognised as the subject (measures.recognised_as_subject) in >= 80% of seeds;
  2. style-only images carry the style (measures.carries_style) in >= 80% of seeds;
  3. base images (every base set) recognised as the subject <= 10% and carrying the style <= 10%;
  4. each judge (CLIP slot, DINO slot) agrees with the transparent measures' ranking of subject-only vs
     style-only vs base (fused prompt): for each axis (subject: Subject IoU vs the judge's cosine to the mean
     embedding of the subject's training images; style: Style Fid vs the cosine to the style's training
     images) and each pair of sets whose transparent difference is established (paired bootstrap 95% interval
     over the seeds excludes zero), the judge's mean difference has the same sign.
"""
from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fusion_engine.scoring.stats import bootstrap_ci, excludes_zero, paired_difference_ci
from fusion_engine.worlds.toy import data, measures, v2
from fusion_engine.worlds.toy.data import FUSED_PROMPT, STYLE_PROMPT, SUBJECT_PROMPT
from fusion_engine.worlds.toy.sampling import sample
from fusion_engine.worlds.toy.world import (
    DEMO_GUIDANCE,
    DEMO_STEPS,
    GATES_FILE,
    load_judges,
    load_toy_world,
    world_measures,
)

from .common import adapt_threads, log

SETS = {  # name: (role, prompt)
    "subject_only": ("subject", SUBJECT_PROMPT),
    "style_only": ("style", STYLE_PROMPT),
    "base_fused_prompt": ("base", FUSED_PROMPT),
}
MORE_BASE_SETS = {"base_subject_prompt": ("base", SUBJECT_PROMPT), "base_style_prompt": ("base", STYLE_PROMPT)}
RANKED = ("subject_only", "style_only", "base_fused_prompt")
MIN_RECOGNISED, MAX_BASE = 0.8, 0.1


def judge_scores(judge, images_by_set: dict, references: dict) -> dict:
    """{set: {axis: per-image cosine to the axis' reference embedding}}."""
    from fusion_engine.scoring.metrics import embed

    def embedding(images):
        tensor = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() for a in measures.as_arrays(images)])
        with torch.no_grad():
            return torch.nn.functional.normalize(embed(judge, tensor), dim=-1)

    refs = {axis: torch.nn.functional.normalize(embedding(images).mean(0), dim=-1)
            for axis, images in references.items()}
    return {name: {axis: (embedding(images) @ ref).numpy() for axis, ref in refs.items()}
            for name, images in images_by_set.items()}


def ranking_agreement(transparent: dict, judged: dict) -> dict:
    """Pairwise: where the transparent measure establishes an order (paired CI excludes 0), does the judge's mean
    difference have the same sign?"""
    pairs, agree = [], True
    for a, b in itertools.combinations(RANKED, 2):
        t = paired_difference_ci(transparent[a], transparent[b])
        j = paired_difference_ci(judged[a], judged[b])
        established = excludes_zero(t)
        ok = established == 0 or np.sign(j[0]) == established
        agree &= bool(ok)
        pairs.append({"a": a, "b": b, "transparent_diff": [round(v, 4) for v in t],
                      "judge_diff": [round(v, 4) for v in j], "established": established, "agrees": bool(ok)})
    return {"agrees": agree, "pairs": pairs}


def measure(folder: Path, seeds: int, steps: int = DEMO_STEPS, guidance: float = DEMO_GUIDANCE,
            all_base: bool = False, save_sheet: bool = False) -> dict:
    world = load_toy_world(folder)
    decide = world_measures(folder)  # the second world's rivals when its base_config.json says so
    images, per_seed, rates, times = {}, {}, {}, {}
    sheet = [] if save_sheet else None
    sets = {**SETS, **(MORE_BASE_SETS if all_base else {})}
    for name, (role, prompt) in sets.items():
        start = time.perf_counter()
        images[name] = sample(world, role, range(seeds), prompt=prompt, steps=steps, guidance=guidance)
        times[name] = round(time.perf_counter() - start, 1)
        scores = measures.transparent_scores(images[name])
        recognised = decide.recognised_as_subject(images[name])
        carries = decide.carries_style(images[name])
        per_seed[name] = {"subject_iou": [round(float(v), 4) for v in scores["subject_iou"]],
                          "style_fid": [round(float(v), 4) for v in scores["style_fid"]],
                          "recognised": [int(v) for v in recognised], "carries_style": [int(v) for v in carries]}
        rates[name] = {"recognised": float(recognised.mean()), "carries_style": float(carries.mean()),
                       "subject_iou": bootstrap_ci(scores["subject_iou"]),
                       "style_fid": bootstrap_ci(scores["style_fid"])}
        if sheet is not None:
            sheet.append(np.concatenate([np.asarray(i) for i in images[name][:16]], 1))
            Image.fromarray(np.concatenate(sheet, 0)).save(folder / "gates_sheet.png")
        log(f"{name}: recognised {recognised.mean():.2f}, carries style {carries.mean():.2f}, "
            f"Subject IoU {scores['subject_iou'].mean():.3f}, Style Fid {scores['style_fid'].mean():.3f} "
            f"({times[name]} s)")
    # the judges' references: the world's own LoRA data (the second world's subject on its varied grounds)
    datasets = decide if decide is v2 else data
    references = {"subject": [((t.permute(1, 2, 0).numpy() + 1) / 2) for t in datasets.subject_dataset()[0]],
                  "style": [((t.permute(1, 2, 0).numpy() + 1) / 2) for t in datasets.style_dataset()[0]]}
    clip, dino = load_judges(folder)
    judges = {}
    for judge_name, judge in (("clip", clip), ("dino", dino)):
        judged = judge_scores(judge, {n: images[n] for n in RANKED}, references)
        axes = {}
        for axis, metric in (("subject", "subject_iou"), ("style", "style_fid")):
            transparent = {n: np.array(per_seed[n][metric]) for n in RANKED}
            axes[axis] = ranking_agreement(transparent, {n: judged[n][axis] for n in RANKED})
            axes[axis]["judge_means"] = {n: round(float(judged[n][axis].mean()), 4) for n in RANKED}
            axes[axis]["transparent_means"] = {n: round(float(transparent[n].mean()), 4) for n in RANKED}
        judges[judge_name] = axes
    base_sets = [n for n in sets if n.startswith("base")]
    gates = {
        "subject_only_recognised": {"value": rates["subject_only"]["recognised"], "need": f">= {MIN_RECOGNISED}",
                                    "pass": rates["subject_only"]["recognised"] >= MIN_RECOGNISED},
        "style_only_carries_style": {"value": rates["style_only"]["carries_style"], "need": f">= {MIN_RECOGNISED}",
                                     "pass": rates["style_only"]["carries_style"] >= MIN_RECOGNISED},
        "base_recognised": {"value": max(rates[n]["recognised"] for n in base_sets), "need": f"<= {MAX_BASE}",
                            "pass": max(rates[n]["recognised"] for n in base_sets) <= MAX_BASE},
        "base_carries_style": {"value": max(rates[n]["carries_style"] for n in base_sets), "need": f"<= {MAX_BASE}",
                               "pass": max(rates[n]["carries_style"] for n in base_sets) <= MAX_BASE},
        "judges_agree": {"value": {j: {a: judges[j][a]["agrees"] for a in judges[j]} for j in judges},
                         "need": "every established pairwise order matched",
                         "pass": all(judges[j][a]["agrees"] for j in judges for a in judges[j])},
    }
    return {"settings": {"seeds": seeds, "steps": steps, "guidance": guidance, "sampler": "Euler",
                         "thresholds": {"subject_iou": measures.SUBJECT_THRESHOLD,
                                        "style_fid": measures.STYLE_THRESHOLD}},
            "gates": gates, "all_pass": all(g["pass"] for g in gates.values()), "rates": rates, "judges": judges,
            "sample_seconds": times, "per_seed": per_seed,
            "machine": f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, help="the folder with the world's weights")
    parser.add_argument("--seeds", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--all-base", action="store_true", help="also the base model under the subject / style prompt")
    parser.add_argument("--out", default=None, help=f"where to write the JSON (default WEIGHTS/{GATES_FILE})")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    adapt_threads(args.threads)
    start = time.perf_counter()
    result = measure(Path(args.weights), args.seeds, all_base=args.all_base, save_sheet=True)
    result["wall_s"] = round(time.perf_counter() - start, 1)
    out = Path(args.out) if args.out else Path(args.weights) / GATES_FILE
    out.write_text(json.dumps(result, indent=1))
    for name, gate in result["gates"].items():
        log(f"gate {name}: {gate['value']} (need {gate['need']}): {'PASS' if gate['pass'] else 'FAIL'}")
    log(f"wrote {out} ({result['wall_s']} s)")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
