"""Per-layer delta norms of a world's two LoRAs, side by side (issue 24: "symmetric LoRAs", for the card).

For each layer either LoRA adapts: the Frobenius norm of its delta, ``alpha / rank * ||B @ A||_F`` (the file's
own scale; the user's strength is 1), and on the layers both adapt the ratio subject / style. FLS keeps, per
layer and step, the branch whose output moves the prediction more, so a LoRA whose deltas are systematically
larger wins by construction: this table shows the balance before anyone reads a trace.

    python -m training.toy.lora_norms [--weights DIR] [--out norms.json] [--markdown norms.md]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def delta_norms(lora) -> dict[str, float]:
    """{layer: alpha / rank * ||B @ A||_F}."""
    return {name: float(layer.delta_weight().norm()) * lora.layer_scale(name) for name, layer in lora.layers.items()}


def compare(subject: dict[str, float], style: dict[str, float]) -> dict:
    """Per layer both norms; a summary over the layers both adapt (ratio subject / style) and the others."""
    shared = sorted(set(subject) & set(style))
    ratios = [subject[n] / style[n] for n in shared if style[n] > 0]
    summary = {
        "layers": {"subject": len(subject), "style": len(style), "both": len(shared),
                   "subject_only": len(set(subject) - set(style)), "style_only": len(set(style) - set(subject))},
        "total_norm": {"subject": round(sum(subject.values()), 4), "style": round(sum(style.values()), 4)},
        "shared_ratio_subject_over_style": ({"median": round(statistics.median(ratios), 4),
                                             "min": round(min(ratios), 4), "max": round(max(ratios), 4),
                                             "layers_subject_larger": sum(r > 1 for r in ratios)}
                                            if ratios else None),
    }
    per_layer = {name: {"subject": round(subject.get(name, 0.0), 5), "style": round(style.get(name, 0.0), 5)}
                 for name in sorted(set(subject) | set(style))}
    return {"summary": summary, "per_layer": per_layer}


def markdown(result: dict) -> str:
    lines = ["| layer | subject | style | subject / style |", "|---|---|---|---|"]
    for name, norms in result["per_layer"].items():
        ratio = f"{norms['subject'] / norms['style']:.2f}" if norms["subject"] and norms["style"] else "-"
        lines.append(f"| `{name}` | {norms['subject']:.4f} | {norms['style']:.4f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    from fusion_engine.lora import load_lora
    from fusion_engine.worlds.toy.world import STYLE_FILE, SUBJECT_FILE, WEIGHTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--out", default=None, help="JSON (default: print the summary only)")
    parser.add_argument("--markdown", default=None, help="also a per-layer markdown table, for the card")
    args = parser.parse_args(argv)
    folder = Path(args.weights)
    result = compare(delta_norms(load_lora(folder / SUBJECT_FILE)), delta_norms(load_lora(folder / STYLE_FILE)))
    result["weights"] = str(folder)
    print(json.dumps(result["summary"], indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    if args.markdown:
        Path(args.markdown).write_text(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
